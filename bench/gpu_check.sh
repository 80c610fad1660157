#!/usr/bin/env bash
# Issue 17's GPU checks in one run, for a lent GPU machine (the device tool runs it in a copy of the
# working tree). Each part has its own time limit and a failure does not stop the next; logs and
# results go to $OUT.
#
#   1. the engine tests on CUDA (MODELSERVE_TEST_DEVICE=cuda)
#   2. a step profile: llama-1b bf16 at batch 1, 8 and 32 (goal: a decode step at batch 32 under 6 ms)
#   3. llama-1b bf16 over gRPC at C=1 and C=32 with CUDA graphs and with --enforce-eager, and the
#      engine in-process
#
# The machine has torch but not this project's other packages, and no network: they travel as wheels
# in .whl (bench/gpu_wheels.sh fetches them here) and are installed into /tmp/site first.
#
#     NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/out PRESET=tiny DEVICE=cpu DTYPE=float32 bash bench/gpu_check.sh
#     (a dry run on a CPU)
set -u
OUT=${OUT:-/tmp/gpu-check}
PRESET=${PRESET:-llama-1b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:clients/python/src:.${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}

(nvidia-smi -L; $PY -c 'import torch, transformers, grpc; print("torch", torch.__version__, "transformers",
transformers.__version__, "grpc", grpc.__version__, "cuda", torch.cuda.is_available())'; nproc; git log -1 --oneline
) 2>&1 | tee "$OUT/versions.txt"

echo "== 0. the preset's model, built once"
timeout 90 $PY -c "from bench.harness import model_dir; print(model_dir('$PRESET'))"

echo "== 1. engine tests on $DEVICE"
MODELSERVE_TEST_DEVICE=$DEVICE timeout 120 $PY -m pytest -q -p no:cacheprovider --timeout 90 -rf \
    tests/test_engine.py tests/test_families.py 2>&1 | tee "$OUT/tests.log" | tail -40

echo "== 2. step profile"
timeout 120 $PY -m bench.step_profile --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --batch 1 8 32 \
    --repeat 10 2>&1 | tee "$OUT/step_profile.log" | grep -v '^-\|^Name\|^Self' | head -40

echo "== 3. serving over gRPC, CUDA graphs and eager"
timeout 270 $PY -m bench.serving_bench --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --requests 48 \
    --concurrency 1 32 --baselines d --compare-eager 2>&1 | tee "$OUT/serving.log" | tail -20
cp bench/results/serving-"$PRESET"-"$DEVICE".md bench/results/serving-"$PRESET"-"$DEVICE".json "$OUT"/ 2>/dev/null
for log in bench/results/serving-server*.log; do
    [ -f "$log" ] && grep -E "WARNING|ERROR|Traceback|CUDA graph|threads|KV" "$log" | head -40
done >"$OUT/server_logs.txt" 2>&1
cat "$OUT"/serving-"$PRESET"-"$DEVICE".md 2>/dev/null
