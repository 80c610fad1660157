# modelserve: `make serve` and `make test` do all the set-up on a fresh machine.
#
# torch: a CPU build (2.13.0) is installed into .venv only when .venv has no torch
# yet; a user's own CUDA torch is kept. Use your own build with
#   make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" serve
# or install torch into .venv first. Nothing here installs an unpinned torch.
#
# `make` alone (or `make help`) lists the targets: each target's `## ` comment is its line there.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-tools
PYTEST_ARGS ?=
SERVE_ARGS ?=
BENCH_ARGS ?=

.PHONY: help install serve test lint proto bench bench-quick bench-telemetry bench-vllm soak clean
.DEFAULT_GOAL := help

help: ## list the targets and the variables they take (also what `make` alone does)
	@echo "usage: make TARGET [VARIABLE=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "variables:"
	@echo "  SERVE_ARGS       flags for modelserve serve, e.g. SERVE_ARGS=\"--model /models/llama --port 50051\""
	@echo "  PYTEST_ARGS      flags for pytest, e.g. PYTEST_ARGS=\"-k stop -x\""
	@echo "  BENCH_ARGS       flags for the bench and soak scripts"
	@echo "  TORCH_SPEC       the torch pip installs when .venv has none (default: $(TORCH_SPEC))"

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	@echo "installing into $(VENV): the first time downloads torch and transformers (a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -c constraints.txt -e clients/python -e ".[dev]"
	touch $@

# What only the tests (and `make proto`) use; without one, the tests that need it skip and say why.
# Made once: after installing a missing tool yourself, `rm .venv/.test-tools` makes it look again.
$(TEST_STAMP): $(STAMP) clients/node/package-lock.json scripts/go_offline.py
	@# Debian packages, installed where we may (root, apt-get): chromium for the browser test; Go with
	@# Debian's grpc-go and protobuf-go sources for the Go stubs and client, which build offline from them.
	@chromium=; go="$$($(BIN)/python scripts/go_offline.py --needs)"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || chromium="chromium"; \
	if [ -z "$$chromium$$go" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq || echo "note: apt-get update failed"; \
		for pkgs in "$$chromium" "$$go"; do [ -z "$$pkgs" ] \
			|| DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs \
			|| echo "note: apt-get install $$pkgs failed: the tests that need them will skip"; done; \
	else echo "note: $$chromium $$go not installed (that needs root and apt-get): the tests that need them will skip"; fi
	@# protoc-gen-go, built from Debian's protobuf-go sources into $(BIN) (scripts/go_offline.py).
	$(BIN)/python scripts/go_offline.py $(BIN)
	@# The Node client (clients/node: its pinned packages, then its build); without npm its test skips.
	@if command -v npm >/dev/null 2>&1; then cd clients/node && npm ci --no-audit --no-fund \
		|| echo "note: npm ci failed in clients/node: the Node client test will skip"; \
		else echo "note: npm is not installed: the Node client is not built and its test will skip"; fi
	@# The smg router (a Rust binary in a wheel; its few Python needs are ours already), for tests/test_smg.py.
	$(BIN)/python -m pip install -c constraints.txt smg==1.13.0 \
		|| echo "note: smg could not be installed: tests/test_smg.py will skip"
	@# lm-evaluation-harness in its own environment (bench/lm_eval_peer.py), for tests/test_lm_eval.py.
	$(BIN)/python -m bench.lm_eval_peer --install \
		|| echo "note: lm-eval could not be installed in bench/.venv-lmeval: tests/test_lm_eval.py will skip"
	touch $@

install: $(STAMP) $(TEST_STAMP) ## create .venv with the server, the client and the dev tools (torch only if missing), and the tests' tools

serve: $(STAMP) ## install the server, then serve the demo model (or SERVE_ARGS="--model DIR") on 0.0.0.0:50051
	$(BIN)/modelserve serve $(SERVE_ARGS)

test: $(STAMP) $(TEST_STAMP) ## install, then run the test suite (PYTEST_ARGS="-k stop -x" to pick)
	@# The CPU paged decode kernel, built once ahead (~15 s) rather than inside the first test's engine.
	$(BIN)/python -m modelserve.engine.paged_decode_cpu
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check, mypy --strict and buf lint
	$(BIN)/ruff check src clients tests bench scripts
	$(BIN)/ruff format --check src clients tests bench scripts
	$(BIN)/mypy
	npx --yes @bufbuild/buf@1.75.0 lint

# The serving benchmark (bench/serving_bench.py): modelserve over gRPC vs sequential generate(),
# static batches, transformers' continuous batching and the in-process engine, on a
# GPT-2-small-shaped random model. `bench` writes its table into docs/benchmarks.md.
bench: $(STAMP) ## the full serving benchmark (~30 min on 2 cores); writes docs/benchmarks.md
	$(BIN)/python -m bench.serving_bench --write-docs $(BENCH_ARGS)

bench-quick: $(STAMP) ## the serving benchmark, small (a few minutes); results in bench/results/ only
	$(BIN)/python -m bench.serving_bench --quick $(BENCH_ARGS)

# Telemetry's own cost (bench/telemetry_cost.py): one request's, one engine step's and one /metrics scrape's
# telemetry, timed in-process; exits non-zero over its bounds; writes its table into docs/benchmarks.md.
bench-telemetry: $(STAMP) ## telemetry's cost per request, step and scrape, bounded; writes docs/benchmarks.md
	$(BIN)/python -m bench.telemetry_cost --write-docs $(BENCH_ARGS)

# vLLM's CPU build as a peer (bench/vllm_peer.py): one load client, `vllm bench serve`, against modelserve and
# vLLM on one model, each server alone, in turn. vLLM gets its own environment, bench/.venv-vllm, made here on
# first use (`python -m bench.vllm_peer --install`); nothing else (CI, make test) installs it.
bench-vllm: $(STAMP) ## modelserve vs vLLM's CPU build under one load client (installs bench/.venv-vllm first)
	test -x bench/.venv-vllm/bin/vllm || $(BIN)/python -m bench.vllm_peer --install
	$(BIN)/python -m bench.vllm_peer $(BENCH_ARGS)

# Soak and overload (bench/soak.py): thousands of streams with cancels, deadlines, disconnects and
# crashed clients, then 10x the capacity against a small waiting queue; checks for leaks and wrong
# outputs, exits non-zero when a pass condition fails. Writes its table into docs/reliability.md.
soak: $(STAMP) ## soak and 10x overload; fails on leaks or wrong outputs; writes docs/reliability.md
	$(BIN)/python -m bench.soak --write-docs $(BENCH_ARGS)

proto: $(STAMP) $(TEST_STAMP) ## regenerate the stubs from protos/: Python (clients/python), TypeScript and Go (buf.gen.yaml)
	$(BIN)/python scripts/generate_protos.py
	$(BIN)/python scripts/generate_buf_stubs.py

clean: ## remove .venv and the tool caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
