"""A CPU linear, packed for oneDNN or as loaded: where engine/cpu_linears.py's SMALL_FP32_WEIGHT comes from.

Times `F.linear` on the weight as loaded against `PackedLinear` on the same weight, side by side in one run,
for weights from the tiny preset's (64 wide) to gpt2-small's, at a few row counts (a decode step has one
row per running request), in each dtype. By default the weights are cold, as in a step of a model larger
than the last-level cache: each shape gets enough copies to fill more than it, called in turn. With --hot,
one copy, called again and again: a model that fits in the cache (the small ones the threshold decides
about) keeps its weights there from step to step. Medians of interleaved repeats; the ratio is as-loaded
time over packed time (above 1: packing wins). The as-loaded arm is `F.linear` on nn.Linear's [out, in]
layout; GPT-2's Conv1D multiplies its [in, out] weight with `addmm`, which this does not time (the engine
step profile does).

    python -m bench.linear_packing_bench
    python -m bench.linear_packing_bench --hot --threads 2 --write-docs
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from bench import harness
from modelserve.engine.cpu_linears import SMALL_FP32_WEIGHT, PackedLinear

SHAPES = [(64, 1024), (256, 256), (512, 512), (384, 1152), (768, 768), (512, 2048), (768, 3072)]  # in, out
COLD_BYTES = 512 << 20  # copies of a shape's weight to cycle through: more than this CPU's 300 MiB L3
MIN_CALLS = 256  # calls a timing makes at least


def _per_call_us(calls: Sequence[Callable[[], object]]) -> float:
    """Mean microseconds a call, cycling through `calls` (each a different copy of the weight)."""
    n = max(len(calls), MIN_CALLS)
    started = time.perf_counter()
    for i in range(n):
        calls[i % len(calls)]()
    return 1e6 * (time.perf_counter() - started) / n


def _compare(k: int, n: int, rows: int, dtype: torch.dtype, repeat: int, hot: bool) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(k * 31 + n)
    copies = 1 if hot else max(2, COLD_BYTES // (k * n * torch.finfo(dtype).bits // 8))
    weights = [torch.randn(n, k, generator=generator).to(dtype) for _ in range(copies)]
    bias = torch.randn(n, generator=generator).to(dtype)
    packed = [PackedLinear(w, bias) for w in weights]
    x = torch.randn(rows, k, generator=generator).to(dtype)
    loaded_calls = [partial(torch.nn.functional.linear, x, w, bias) for w in weights]
    packed_calls = [partial(p, x) for p in packed]
    loaded, packed_us = [], []
    for _ in range(repeat + 1):  # interleaved; the first pair warms up
        loaded.append(_per_call_us(loaded_calls))
        packed_us.append(_per_call_us(packed_calls))
    return harness.pct(loaded[1:], 0.5), harness.pct(packed_us[1:], 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny core's: 1)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hot", action="store_true", help="one copy of each weight, kept in the cache")
    parser.add_argument("--write-docs", action="store_true")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    info = harness.run_info("cpu", "bench.linear_packing_bench")
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for dtype_name in ns.dtype:
            for k, n in SHAPES:
                for rows in ns.rows:
                    loaded, packed = _compare(k, n, rows, getattr(torch, dtype_name), ns.repeat, ns.hot)
                    row = dict(dtype=dtype_name, in_features=k, out_features=n, rows=rows)
                    results.append({**row, "as_loaded_us": loaded, "packed_us": packed, "ratio": loaded / packed})
                    print(results[-1], flush=True)
    weights = "hot (one copy, in the cache)" if ns.hot else "cold (copies past the last-level cache)"
    lines = harness.header(
        "CPU linears: as loaded (F.linear) vs packed for oneDNN",
        info,
        f"workload: {ns.threads} thread(s); weights {weights}; medians of "
        f"{ns.repeat} interleaved repeats; fp32 weights under {SMALL_FP32_WEIGHT:,} elements stay as loaded",
    )
    lines += ["| dtype | weight (in x out) | rows | as loaded us | packed us | as loaded / packed |"]
    lines += ["|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['in_features']} x {r['out_features']} | {r['rows']} | {r['as_loaded_us']:.1f} "
            f"| {r['packed_us']:.1f} | {r['ratio']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    stem = f"linear-packing-t{ns.threads}" + ("-hot" if ns.hot else "")
    harness.save(stem, {"info": info, "results": results}, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", stem, table)


if __name__ == "__main__":
    main()
