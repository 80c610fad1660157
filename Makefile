# modelserve: `make serve` and `make test` do all the set-up on a fresh machine.
#
# torch: a CPU build (2.13.0) is installed into .venv only when .venv has no torch
# yet; a user's own CUDA torch is kept. Use your own build with
#   make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" serve
# or install torch into .venv first. Nothing here installs an unpinned torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SERVE_ARGS ?=
BENCH_ARGS ?=

.PHONY: install serve test lint proto bench bench-quick bench-telemetry soak clean

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e clients/python -e ".[dev]"
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/modelserve serve $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src clients tests bench scripts
	$(BIN)/ruff format --check src clients tests bench scripts
	$(BIN)/mypy
	npx --yes @bufbuild/buf@1.75.0 lint

# The serving benchmark (bench/serving_bench.py): modelserve over gRPC vs sequential generate(),
# static batches, transformers' continuous batching and the in-process engine, on a
# GPT-2-small-shaped random model. `bench` writes its table into docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python bench/serving_bench.py --write-docs $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python bench/serving_bench.py --quick $(BENCH_ARGS)

# Telemetry on vs off as an A/B in one server process (bench/telemetry_cost.py); writes its table into
# docs/benchmarks.md. BENCH_ARGS="--rounds 96" for a tighter interval.
bench-telemetry: $(STAMP)
	$(BIN)/python bench/telemetry_cost.py --write-docs $(BENCH_ARGS)

# Soak and overload (bench/soak.py): thousands of streams with cancels, deadlines, disconnects and
# crashed clients, then 10x the capacity against a small waiting queue; checks for leaks and wrong
# outputs, exits non-zero when a pass condition fails. Writes its table into docs/reliability.md.
soak: $(STAMP)
	$(BIN)/python bench/soak.py --write-docs $(BENCH_ARGS)

proto: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
