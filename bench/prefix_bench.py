"""Prefix-caching benchmark: many requests that share a long system prompt, served with the cache and without.

Two real servers, one after the other in one run, on the same machine and the same requests: one as
configured by default (prefix caching on), one with `--no-prefix-caching`. Each request is the shared
system prompt and its own short question, sent by a closed loop of clients over gRPC. Reports time to
first token (the prefill the cache saves), throughput, the prompt tokens each server reported as
cached (Usage.cached_tokens), and whether the greedy outputs of the two servers are identical.

Writes JSON and a markdown table to bench/results/, with --write-docs the table into docs/benchmarks.md.

    python -m bench.prefix_bench --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import harness

TTFT_TARGET = 3.0  # TTFT p50 without the cache over TTFT p50 with it


@dataclass
class Result:
    ttft_s: float
    token_ids: list[int]
    cached_tokens: int


async def one_request(stub: Any, prompt: str, max_new: int) -> Result:
    start = time.perf_counter()
    ttft = None
    ids: list[int] = []
    cached = 0
    async for message in stub.Generate(harness.generate_request(prompt, max_new)):
        if message.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        ids.extend(message.token_ids)
        cached = message.usage.cached_tokens
    assert ttft is not None, "a stream ended without a token"
    return Result(ttft, ids, cached)


async def closed_loop(address: str, prompts: list[str], concurrency: int, max_new: int) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending the next prompt when its last one has ended; results in prompt order."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    results: list[Result | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def client() -> None:
            while todo:
                i = todo.pop(0)
                results[i] = await one_request(stub, prompts[i], max_new)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def serve_and_run(path: Path, ns: argparse.Namespace, prompts: list[str], caching: bool) -> dict[str, Any]:
    """One server (caching on or off) for the whole workload; its row of the table."""
    flags = ["--device", ns.device, "--dtype", ns.dtype, "--max-batch-size", str(ns.max_batch_size)]
    if not caching:
        flags.append("--no-prefix-caching")
    server = harness.start_server(harness.RESULTS, "--model", str(path), *flags, name="prefix-server")
    try:
        server.wait_serving(timeout_s=600)
        results, wall = asyncio.run(closed_loop(server.address, prompts, ns.concurrency, ns.max_new_tokens))
    finally:
        server.terminate(120)
    ttft = [r.ttft_s for r in results]
    tokens = sum(len(r.token_ids) for r in results)
    run = {
        "name": f"prefix caching {'on' if caching else 'off (--no-prefix-caching)'}",
        "requests": len(results),
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "req_per_s": len(results) / wall,
        "ttft_p50_ms": 1e3 * harness.pct(ttft, 0.5),
        "ttft_p99_ms": 1e3 * harness.pct(ttft, 0.99),
        "cached_tokens_mean": statistics.mean(r.cached_tokens for r in results),
        "requests_with_cached_tokens": sum(r.cached_tokens > 0 for r in results),
        "outputs": [r.token_ids for r in results],
    }
    print(f"  {run['name']}: TTFT p50 {run['ttft_p50_ms']:.1f} ms, {run['tok_per_s']:.1f} tok/s", flush=True)
    return run


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *harness.header(report["title"], report, f"workload: {report['workload']}"),
        "| run | requests | TTFT p50 / p99 ms | output tok/s | req/s | cached prompt tokens, mean (requests) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['name']} | {run['requests']} | {run['ttft_p50_ms']:.1f} / {run['ttft_p99_ms']:.1f} | "
            f"{run['tok_per_s']:.1f} | {run['req_per_s']:.2f} | "
            f"{run['cached_tokens_mean']:.0f} ({run['requests_with_cached_tokens']}) |"
        )
    ratio, throughput = report["ttft_p50_ratio"], report["throughput_ratio"]
    verdict = "met" if ratio >= TTFT_TARGET else f"MISSED by {100 * (1 - ratio / TTFT_TARGET):.0f}%"
    lines += [
        "",
        f"- TTFT p50, off over on: **{ratio:.2f}x** (>= {TTFT_TARGET}x: {verdict}); "
        f"throughput, on over off: **{throughput:.2f}x**",
        f"- greedy outputs identical with and without the cache: **{'yes' if report['identical'] else 'NO'}**",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(harness.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1024, help="the shared system prompt's length")
    parser.add_argument("--question-tokens", type=int, nargs=2, default=[8, 32], help="each question's length range")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    from tokenizers import Tokenizer

    path = harness.model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool = harness.clean_token_ids(tokenizer)
    rng = random.Random(3)
    system = tokenizer.decode(harness.make_prompt(tokenizer, pool, ns.system_tokens, rng))
    prompts = [
        system + tokenizer.decode(harness.make_prompt(tokenizer, pool, rng.randint(*ns.question_tokens), rng))
        for _ in range(ns.requests)
    ]
    prompt_tokens = [len(tokenizer.encode(p).ids) for p in prompts]

    on = serve_and_run(path, ns, prompts, caching=True)
    off = serve_and_run(path, ns, prompts, caching=False)
    identical = on.pop("outputs") == off.pop("outputs")
    report = {
        "title": f"Prefix caching: {ns.preset}, {ns.dtype} on {ns.device}",
        **harness.run_info(ns.device, "bench.prefix_bench"),
        "workload": (
            f"{ns.requests} requests sharing a {ns.system_tokens}-token system prompt, each with its own question "
            f"of {ns.question_tokens[0]}-{ns.question_tokens[1]} tokens (prompts {min(prompt_tokens)}-"
            f"{max(prompt_tokens)} tokens); {ns.max_new_tokens} new tokens each, greedy, EOS off; closed loop "
            f"C={ns.concurrency}, --max-batch-size {ns.max_batch_size}; each server serves the workload once, "
            "from a cold cache"
        ),
        "runs": [on, off],
        "ttft_p50_ratio": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "throughput_ratio": on["tok_per_s"] / off["tok_per_s"],
        "identical": identical,
    }
    table = markdown(report)
    harness.save(f"prefix-{ns.preset}-{ns.device}", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"prefix-{ns.preset}-{ns.device}", table)


if __name__ == "__main__":
    main()
