"""Serving benchmark: modelserve over real gRPC against the classic patterns, one workload, one run.

The server runs as its own process and is driven over gRPC streams from this
process. The baselines run here afterwards, on the same requests and the same
machine, so every ratio compares figures taken side by side:

  (a) sequential `generate()` per request (the classic one-at-a-time server)
  (b) static batches of fixed size through padded `generate()`
  (c) transformers' continuous batching (`init_continuous_batching`), offline
  (d) modelserve's engine in-process, no gRPC (its own ceiling), built as the server builds it

Writes JSON and a markdown table (bench/results/), and with --write-docs
the table into docs/benchmarks.md.

    python -m bench.serving_bench --quick          # make bench-quick
    python -m bench.serving_bench --write-docs     # make bench
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.harness import (
    CACHE_DIR,
    PRESETS,
    RESULTS,
    header,
    model_dir,
    pct,
    run_info,
    save,
    start_server,
    write_docs,
)


@dataclass
class Req:
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class Result:
    output_tokens: int
    ttft_s: float | None  # None where the baseline cannot see tokens arrive
    itl_s: list[float]  # gaps between successive token messages


@dataclass
class RunStats:
    name: str
    requests: int
    output_tokens: int
    wall_s: float
    tok_per_s: float
    req_per_s: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(name: str, results: list[Result], wall_s: float) -> RunStats:
    tokens = sum(r.output_tokens for r in results)
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [x for r in results for x in r.itl_s]
    stats = RunStats(name, len(results), tokens, wall_s, tokens / wall_s, len(results) / wall_s)
    if ttft:
        stats.ttft_p50_ms, stats.ttft_p99_ms = 1e3 * pct(ttft, 0.5), 1e3 * pct(ttft, 0.99)
    if itl:
        stats.itl_p50_ms, stats.itl_p99_ms = 1e3 * pct(itl, 0.5), 1e3 * pct(itl, 0.99)
    return stats


def clean_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose text is printable and encodes back to the same id: prompts built from them
    keep their length through decode -> encode, so every run sees the same prompt tokens."""
    ids = []
    for i in range(tokenizer.get_vocab_size()):
        piece = tokenizer.decode([i])
        if piece and piece.isprintable() and "\ufffd" not in piece and tokenizer.encode(piece).ids == [i]:
            ids.append(i)
    return ids


def make_prompt(tokenizer: Any, pool: list[int], length: int, rng: random.Random) -> list[int]:
    """`length` tokens (within one or two) of text, exactly as the tokenizer encodes it."""
    pieces = [rng.choice(pool) for _ in range(length)]
    ids: list[int] = list(tokenizer.encode(tokenizer.decode(pieces)).ids)
    while len(ids) < length:  # neighbouring pieces merge: add more until long enough
        pieces += [rng.choice(pool) for _ in range(length - len(ids))]
        ids = list(tokenizer.encode(tokenizer.decode(pieces)).ids)
    for _ in range(8):  # cut to length; a cut can re-merge at the edge, so settle it
        settled = list(tokenizer.encode(tokenizer.decode(ids[:length])).ids)
        if settled == ids[:length] or len(settled) <= length:
            return settled
        ids = settled
    return ids


def make_workload(
    tokenizer: Any, pool: list[int], n: int, seed: int, prompt_range: tuple[int, int], new_range: tuple[int, int]
) -> list[Req]:
    rng = random.Random(seed)
    return [
        Req(make_prompt(tokenizer, pool, rng.randint(*prompt_range), rng), rng.randint(*new_range)) for _ in range(n)
    ]


# ---- modelserve over gRPC, and its engine in-process ------------------------------------------------------------


def ids_request(req: Req, tokenizer: Any) -> Any:
    from modelserve_client.v1 import generation_pb2 as pb

    # The prompt goes as text; it encodes back to exactly req.prompt_ids (see make_prompt).
    params = pb.GenerationParameters(max_new_tokens=req.max_new_tokens, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(prompt=tokenizer.decode(req.prompt_ids), params=params)


async def timed_tokens(messages: AsyncIterator[Any]) -> Result:
    """Time a stream of messages or engine events (anything with token_ids) as they arrive."""
    start = time.perf_counter()
    last = first = None
    gaps: list[float] = []
    tokens = 0
    async for message in messages:
        if not message.token_ids:
            continue
        now = time.perf_counter()
        tokens += len(message.token_ids)
        if first is None:
            first = now - start
        else:
            gaps.append(now - last)  # type: ignore[operator]
        last = now
    return Result(tokens, first or 0.0, gaps)


async def closed_loop(
    reqs: list[Req], concurrency: int, one: Callable[[Req], Awaitable[Result]]
) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending the next request when its last one has ended."""
    todo = list(reqs)
    results: list[Result] = []

    async def client() -> None:
        while todo:
            results.append(await one(todo.pop(0)))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def grpc_closed_loop(
    address: str, reqs: list[Req], concurrency: int, tokenizer: Any
) -> tuple[list[Result], float]:
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        return await closed_loop(reqs, concurrency, lambda r: timed_tokens(stub.Generate(ids_request(r, tokenizer))))


async def grpc_poisson(
    address: str, reqs: list[Req], rate: float, tokenizer: Any, seed: int
) -> tuple[list[Result], float]:
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.ensure_future(timed_tokens(stub.Generate(ids_request(req, tokenizer)))))
            await asyncio.sleep(rng.expovariate(rate))  # the arrival process itself, not a wait for state
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def grpc_long_prompt(
    address: str, tokenizer: Any, pool: list[int], long_len: int, streams: int
) -> dict[str, Any]:
    """`streams` running streams; one long prompt arrives among them: their inter-token latency before/while."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(5)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stamps: list[list[float]] = [[] for _ in range(streams)]

        async def running(i: int) -> None:
            req = Req(make_prompt(tokenizer, pool, 32, rng), 160)
            async for message in stub.Generate(ids_request(req, tokenizer)):
                if message.token_ids:
                    stamps[i].append(time.perf_counter())

        tasks = [asyncio.ensure_future(running(i)) for i in range(streams)]
        while min(len(s) for s in stamps) < 20:  # noqa: ASYNC110 (a benchmark's warm-up, not a test's wait)
            await asyncio.sleep(0.01)
        steady = time.perf_counter()  # gaps are counted from here: the streams' own start-up is not the question
        long_req = Req(make_prompt(tokenizer, pool, long_len, rng), 4)
        t0 = time.perf_counter()
        long_ttft = None
        async for message in stub.Generate(ids_request(long_req, tokenizer)):
            if message.token_ids and long_ttft is None:
                long_ttft = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        gaps = [b - a for s in stamps for a, b in itertools.pairwise(s) if a >= steady]
        during = [b - a for s in stamps for a, b in itertools.pairwise(s) if t0 <= b <= t0 + (long_ttft or 0)]
        p50, p99 = statistics.median(gaps), pct(gaps, 0.99)
        return {
            "long_prompt_tokens": len(long_req.prompt_ids),
            "running_streams": streams,
            "itl_p50_ms": 1e3 * p50,
            "itl_p99_ms": 1e3 * p99,
            "itl_p99_over_p50": p99 / p50,
            "itl_max_during_prefill_ms": 1e3 * max(during) if during else None,
            "long_prompt_ttft_s": long_ttft,
        }


async def run_engine_inprocess(config: Any, loaded: Any, reqs: list[Req], concurrency: int) -> RunStats:
    """The server's engine (build_engine from the server's Config) in this process, no gRPC."""
    from modelserve.engine.request import Request, SamplingParams
    from modelserve.server.lifecycle import build_engine

    engine = build_engine(config, loaded)
    engine.start(asyncio.get_running_loop())

    def one(req: Req) -> Awaitable[Result]:
        params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=0.0, ignore_eos=True)
        return timed_tokens(engine.submit(Request("b", tuple(req.prompt_ids), params)))

    results, wall = await closed_loop(reqs, concurrency, one)
    engine.shutdown()
    return summarise(f"(d) modelserve engine in-process, C={concurrency}", results, wall)


# ---- baselines in this process --------------------------------------------------------------------------------


def generate_batch(model: Any, group: list[Req], device: Any) -> None:
    """One padded, greedy `generate()` of `group` to its longest max_new_tokens, EOS off."""
    import torch

    width = max(len(r.prompt_ids) for r in group)
    ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in group], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in group], device=device)
    longest = max(r.max_new_tokens for r in group)
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=longest,
        min_new_tokens=longest,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )


def run_batches(name: str, model: Any, reqs: list[Req], batch: int, device: Any) -> RunStats:
    """(a) is batches of one; (b) static batches, where only each request's own tokens are useful."""
    start = time.perf_counter()
    for i in range(0, len(reqs), batch):
        generate_batch(model, reqs[i : i + batch], device)
    return summarise(name, [Result(r.max_new_tokens, None, []) for r in reqs], time.perf_counter() - start)


def run_hf_continuous(model: Any, reqs: list[Req], concurrency: int) -> RunStats:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    need = sum(sorted((len(r.prompt_ids) + r.max_new_tokens for r in reqs), reverse=True)[:concurrency])
    page = 64
    config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=need // page + 2 * concurrency,
        max_batch_tokens=512,
        max_requests_per_batch=concurrency,
    )
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs), eos_token_id=None, pad_token_id=0
    )
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, req in enumerate(reqs):
            manager.add_request(req.prompt_ids, request_id=str(i), max_new_tokens=req.max_new_tokens)
        results: list[Result] = []
        while len(results) < len(reqs):
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("transformers continuous batching returned no result")
            results.append(Result(len(out.generated_tokens), None, []))
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return summarise("(c) transformers continuous batching", results, wall)


# ---- report -----------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *header(report["title"], report, f"workload: {report['workload']}"),
        "| run | requests | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['name']} | {run['requests']} | {run['tok_per_s']:.1f} | {run['req_per_s']:.2f} | "
            f"{fmt(run['ttft_p50_ms'])} / {fmt(run['ttft_p99_ms'])} | "
            f"{fmt(run['itl_p50_ms'])} / {fmt(run['itl_p99_ms'])} |"
        )
    lines += ["", "Ratios, modelserve over gRPC at the largest C against each baseline (target in brackets):", ""]
    for name, (ratio, target) in report["ratios"].items():
        verdict = "met" if ratio >= target else f"MISSED by {100 * (1 - ratio / target):.0f}%"
        lines.append(f"- vs {name}: **{ratio:.2f}x** (>= {target}x: {verdict})")
    lp = report["long_prompt"]
    lines += [
        "",
        f"Long prompt: one {lp['long_prompt_tokens']}-token prompt arrives among {lp['running_streams']} running "
        f"streams: their ITL p50 {lp['itl_p50_ms']:.1f} ms, p99 {lp['itl_p99_ms']:.1f} ms "
        f"(p99/p50 = **{lp['itl_p99_over_p50']:.2f}**, target <= 3); worst gap while it was prefilled "
        f"{fmt(lp['itl_max_during_prefill_ms'])} ms; its TTFT {fmt(lp['long_prompt_ttft_s'], 2)} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in a few minutes")
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--rate", type=float, default=None, help="Poisson arrivals per second (default: off in --quick)"
    )
    parser.add_argument("--requests", type=int, default=None, help="requests at the largest concurrency")
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ns = parser.parse_args()

    import torch
    from tokenizers import Tokenizer

    from modelserve.config import Config
    from modelserve.server.lifecycle import load

    torch.set_num_threads(os.cpu_count() or 1)
    path = model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool = clean_token_ids(tokenizer)
    top_c = max(ns.concurrency)
    n_top = ns.requests or (32 if ns.quick else 96)
    prompt_range, new_range = ((16, 256), (8, 64)) if ns.quick else ((16, 512), (8, 256))
    workload = make_workload(tokenizer, pool, n_top, 1, prompt_range, new_range)
    runs: list[RunStats] = []

    def ran(stats: RunStats) -> RunStats:
        runs.append(stats)
        print(f"  {stats.name}: {stats.tok_per_s:.1f} tok/s", flush=True)
        return stats

    # ---- modelserve over gRPC (the server is its own process) ----
    config = Config(model=str(path), device=ns.device, dtype=ns.dtype, max_batch_size=32)
    flags = ("--device", ns.device, "--dtype", ns.dtype, "--max-batch-size", str(config.max_batch_size))
    server = start_server(RESULTS, "--model", str(path), *flags, name="serving-server")
    try:
        server.wait_serving(timeout_s=600)
        by_c: dict[int, RunStats] = {}
        for c in sorted(ns.concurrency):
            reqs = workload[: max(c * (2 if ns.quick else 3), 4)] if c < top_c else workload
            results, wall = asyncio.run(grpc_closed_loop(server.address, reqs, c, tokenizer))
            by_c[c] = ran(summarise(f"modelserve gRPC, closed loop C={c}", results, wall))
        rate = ns.rate if ns.rate is not None else (None if ns.quick else by_c[top_c].req_per_s * 0.8)
        if rate:
            results, wall = asyncio.run(grpc_poisson(server.address, workload, rate, tokenizer, seed=2))
            ran(summarise(f"modelserve gRPC, Poisson {rate:.2f} req/s", results, wall))
        long_len = min(ns.long_prompt, PRESETS[ns.preset].get("max_len", 2048) - 200)
        long_prompt = asyncio.run(grpc_long_prompt(server.address, tokenizer, pool, long_len, 16))
        print(f"  long prompt: {long_prompt}", flush=True)
    finally:
        server.terminate(120)

    # ---- baselines, here, after the server has gone ----
    loaded = load(config)
    engine_run = ran(asyncio.run(run_engine_inprocess(config, loaded, workload, top_c)))
    seq_n = 4 if ns.quick else 8
    name = f"(a) sequential generate(), first {seq_n} requests"
    seq = ran(run_batches(name, loaded.model, workload[:seq_n], 1, loaded.device))
    name = f"(b) static batches of {top_c}, padded generate()"
    static = ran(run_batches(name, loaded.model, workload, top_c, loaded.device))
    hf = ran(run_hf_continuous(loaded.model, workload, top_c))

    ours = by_c[top_c].tok_per_s
    ratios = {
        "(a) sequential generate()": (ours / seq.tok_per_s, 10.0),
        "(b) static batches": (ours / static.tok_per_s, 2.0),
        "(c) transformers continuous batching": (ours / hf.tok_per_s, 1.0),
        "(d) modelserve engine in-process": (ours / engine_run.tok_per_s, 0.9),
    }
    report = {
        "title": f"Serving benchmark: {ns.preset}, {ns.dtype} on {ns.device}{' (quick)' if ns.quick else ''}",
        **run_info(ns.device, "bench.serving_bench"),
        "workload": (
            f"{n_top} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens, max_new_tokens "
            f"{new_range[0]}-{new_range[1]}, greedy, EOS off; "
            f"closed loop C={'/'.join(map(str, sorted(ns.concurrency)))}"
            f" (smaller C serve the first 3C requests)"
        ),
        "runs": [asdict(r) for r in runs],
        "ratios": {k: [round(v[0], 3), v[1]] for k, v in ratios.items()},
        "long_prompt": long_prompt,
    }
    table = markdown(report)
    save(f"serving-{ns.preset}-{ns.device}", report, table)
    if ns.write_docs:
        write_docs("benchmarks.md", f"serving-{ns.preset}-{ns.device}{'-quick' if ns.quick else ''}", table)


if __name__ == "__main__":
    main()
