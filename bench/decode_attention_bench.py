"""Decode attention on a CPU: the paged decode kernel (engine/paged_decode_cpu.py) against the gather + SDPA
path it replaced, side by side in one run.

Both through attention.attend, as the engine calls it, on gpt2-small's shape (12 heads of 64; 12 layers of
KV memory, each layer's own tensors, so a step's reads come from memory as in the engine, not from the
cache): every decoding row's context sits in blocks scattered over the memory. Times one whole step's
attention (all layers in turn), medians of interleaved repeats, for each batch, context and dtype.

    python -m bench.decode_attention_bench
    python -m bench.decode_attention_bench --write-docs
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench import harness
from modelserve.engine.attention import StepContext, Workspace, attend
from modelserve.engine.paged_decode_cpu import load

BLOCK = 16
HEADS, HEAD_DIM, LAYERS = 12, 64, 12


def _step(rows: int, context: int, dtype: torch.dtype) -> tuple[StepContext, torch.Tensor, torch.Tensor]:
    """A decode step of `rows` rows with `context` tokens each, their blocks in a random order."""
    generator = torch.Generator().manual_seed(rows * 7919 + context)
    per_row = -(-context // BLOCK)
    num_blocks = rows * per_row + 1
    slots = num_blocks * BLOCK
    keys = [torch.randn(slots, HEADS, HEAD_DIM, generator=generator).to(dtype) for _ in range(LAYERS)]
    values = [torch.randn(slots, HEADS, HEAD_DIM, generator=generator).to(dtype) for _ in range(LAYERS)]
    order = torch.randperm(num_blocks - 1, generator=generator).view(rows, per_row)
    columns = torch.arange(context)
    gather = order[:, columns // BLOCK] * BLOCK + columns % BLOCK
    positions = torch.full((rows,), context - 1)
    step = StepContext(
        keys,
        values,
        gather[:, -1].contiguous(),
        gather,
        positions,
        columns,
        [],
        Workspace(HEADS, HEAD_DIM, dtype, torch.device("cpu")),
    )
    query = torch.randn(HEADS, rows, HEAD_DIM, generator=generator).to(dtype)
    new = torch.randn(HEADS, rows, HEAD_DIM, generator=generator).to(dtype)
    return step, query, new


def _time(step: StepContext, query: torch.Tensor, new: torch.Tensor, kernel: bool) -> float:
    step.decode_kernel = kernel
    started = time.perf_counter()
    for layer in range(LAYERS):
        attend(step, layer, query, new, new, None, None)
    return 1e3 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--write-docs", action="store_true")
    ns = parser.parse_args()
    problem = load()
    if problem is not None:
        raise SystemExit(f"the paged decode kernel could not be built: {problem}")
    info = harness.run_info("cpu", "bench.decode_attention_bench")
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for dtype_name in ns.dtype:
            for batch in ns.batch:
                for context in ns.context:
                    step, query, new = _step(batch, context, getattr(torch, dtype_name))
                    gathered, in_place = [], []
                    for _ in range(ns.repeat + 1):  # interleaved; the first pair warms up
                        gathered.append(_time(step, query, new, kernel=False))
                        in_place.append(_time(step, query, new, kernel=True))
                    g, k = harness.pct(gathered[1:], 0.5), harness.pct(in_place[1:], 0.5)
                    results.append(
                        dict(dtype=dtype_name, batch=batch, context=context, gather_sdpa_ms=g, kernel_ms=k, ratio=g / k)
                    )
                    print(results[-1], flush=True)
    lines = harness.header(
        "Decode attention on a CPU: paged kernel vs gather + SDPA",
        info,
        f"workload: gpt2-small's shape ({HEADS} heads of {HEAD_DIM}), {LAYERS} layers' attention in turn, "
        f"each row's blocks scattered; medians of {ns.repeat} interleaved repeats",
    )
    lines += [
        "| dtype | rows | context | gather + SDPA ms | kernel ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['context']} | {r['gather_sdpa_ms']:.2f} | {r['kernel_ms']:.2f} "
            f"| {r['ratio']:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    harness.save("decode-attention", {"info": info, "results": results}, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", "decode-attention", table)


if __name__ == "__main__":
    main()
