"""Serving benchmark: modelserve over real gRPC against the classic patterns, one workload, one run.

The server runs as its own process, driven over gRPC streams from this one; the baselines run here
afterwards, on the same requests and machine, so every ratio compares figures taken side by side:

  (a) sequential `generate()` per request (the classic one-at-a-time server)
  (b) static batches of fixed size through padded `generate()`
  (c) transformers' continuous batching (`init_continuous_batching`), offline
  (d) modelserve's engine in-process, no gRPC (its own ceiling), built as the server builds it

(a) to (c) run on the model as loaded, before (d)'s engine packs and fuses its layers in place. Then a long
prompt arrives among 16 running streams, after a control run of the same streams without it.

Writes JSON and a markdown table to bench/results/, with --write-docs the table into docs/benchmarks.md.

    python -m bench.serving_bench --quick          # make bench-quick
    python -m bench.serving_bench --write-docs     # make bench
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shlex
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import harness

# With baseline (a): the fewest requests the smaller closed loops and sequential generate() serve, the first of
# the workload, so that C=1 (when not the largest C) and (a) serve the same ones. 4 were about 110 tokens and
# 0.1 s of tiny; 16 measured C=1 / (a) 0.80-0.87. Without (a) the smaller loops serve at least 4.
SMALL_RUN = 16


def small_least(ns: argparse.Namespace) -> int:
    """The fewest requests a smaller closed loop serves."""
    return SMALL_RUN if "a" in ns.baselines else 4


@dataclass
class Req:
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class Result:
    output_tokens: int
    ttft_s: float | None  # None where the baseline cannot see tokens arrive
    itl_s: list[float]  # gaps between successive token messages


def summarise(name: str, results: list[Result], wall_s: float) -> dict[str, Any]:
    """A run's row of the table (printed as it is taken)."""
    tokens = sum(r.output_tokens for r in results)
    run: dict[str, Any] = {
        "name": name,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "tok_per_s": tokens / wall_s,
        "req_per_s": len(results) / wall_s,
    }
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [gap for r in results for gap in r.itl_s]
    for key, values in (("ttft", ttft), ("itl", itl)):
        run[f"{key}_p50_ms"] = 1e3 * harness.pct(values, 0.5) if values else None
        run[f"{key}_p99_ms"] = 1e3 * harness.pct(values, 0.99) if values else None
    print(f"  {name}: {run['tok_per_s']:.1f} tok/s", flush=True)
    return run


def make_workload(
    tokenizer: Any, pool: list[int], n: int, seed: int, prompt_range: tuple[int, int], new_range: tuple[int, int]
) -> list[Req]:
    rng = random.Random(seed)
    return [
        Req(harness.make_prompt(tokenizer, pool, rng.randint(*prompt_range), rng), rng.randint(*new_range))
        for _ in range(n)
    ]


# ---- modelserve over gRPC, and its engine in-process ------------------------------------------------------------


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


async def grpc_runs(
    address: str, workload: list[Req], ns: argparse.Namespace, tokenizer: Any, pool: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Closed loops at each concurrency, Poisson arrivals (not in --quick) and the long prompt: the runs,
    the run at the largest concurrency, and the long prompt's figures."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        def stream(req: Req) -> Any:
            # The prompt goes as text; it encodes back to exactly req.prompt_ids (see harness.make_prompt).
            return stub.Generate(harness.generate_request(tokenizer.decode(req.prompt_ids), req.max_new_tokens))

        # One short request first, as generate() gets a warm-up call: the channel's connection and the server's
        # first-request costs are not its speed. Its own prompt, so the prefix cache gives the runs nothing.
        await timed_tokens(stream(Req(harness.make_prompt(tokenizer, pool, 16, random.Random(7)), 4)))
        runs, least = [], small_least(ns)
        for c in sorted(ns.concurrency):
            # Smaller C serve the first 3C requests (2C in --quick), at least `least`, the largest all of them.
            reqs = workload[: max(c * (2 if ns.quick else 3), least)] if c < max(ns.concurrency) else workload
            results, wall = await closed_loop(reqs, c, lambda r: timed_tokens(stream(r)))
            runs.append(summarise(f"modelserve gRPC, closed loop C={c}", results, wall))
        top = runs[-1]
        if not ns.quick:
            rate, rng = 0.8 * top["req_per_s"], random.Random(2)
            start = time.perf_counter()
            tasks = []
            for req in workload:
                tasks.append(asyncio.ensure_future(timed_tokens(stream(req))))
                await asyncio.sleep(rng.expovariate(rate))  # the arrival process itself, not a wait for state
            results = list(await asyncio.gather(*tasks))
            runs.append(summarise(f"modelserve gRPC, Poisson {rate:.2f} req/s", results, time.perf_counter() - start))
        long_len = min(ns.long_prompt, harness.PRESETS[ns.preset].get("max_len", 2048) - 200)
        control = await long_prompt_run(stream, tokenizer, pool, 0, 16)
        long_prompt = await long_prompt_run(stream, tokenizer, pool, long_len, 16)
        long_prompt["control_itl_p50_ms"] = control["itl_p50_ms"]
        long_prompt["control_itl_p99_ms"] = control["itl_p99_ms"]
        long_prompt["control_itl_p99_over_p50"] = control["itl_p99_over_p50"]
    print(f"  long prompt: {long_prompt}", flush=True)
    return runs, top, long_prompt


async def long_prompt_run(
    stream: Callable[[Req], Any], tokenizer: Any, pool: list[int], long_len: int, streams: int
) -> dict[str, Any]:
    """`streams` running streams; one long prompt arrives among them: their inter-token latency. With
    `long_len` 0 no prompt arrives: the control, what such streams' gaps are on this machine anyway (its
    prompts are drawn from another seed, so the run after it finds none of them cached)."""
    rng = random.Random(5 if long_len else 6)
    stamps: list[list[float]] = [[] for _ in range(streams)]

    async def running(i: int) -> None:
        async for message in stream(Req(harness.make_prompt(tokenizer, pool, 32, rng), 160)):
            if message.token_ids:
                stamps[i].append(time.perf_counter())

    tasks = [asyncio.ensure_future(running(i)) for i in range(streams)]
    while min(len(s) for s in stamps) < 20:  # noqa: ASYNC110 (a benchmark's warm-up, not a test's wait)
        await asyncio.sleep(0.01)
    steady = t0 = time.perf_counter()  # gaps are counted from here: the streams' start-up is not the question
    long_tokens, long_ttft = 0, None
    if long_len:
        long_req = Req(harness.make_prompt(tokenizer, pool, long_len, rng), 4)
        long_tokens = len(long_req.prompt_ids)
        t0 = time.perf_counter()
        async for message in stream(long_req):
            if message.token_ids and long_ttft is None:
                long_ttft = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s) if a >= steady]
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if t0 <= b <= t0 + (long_ttft or 0)]
    p50, p99 = statistics.median(gaps), harness.pct(gaps, 0.99)
    return {
        "long_prompt_tokens": long_tokens,
        "running_streams": streams,
        "itl_p50_ms": 1e3 * p50,
        "itl_p99_ms": 1e3 * p99,
        "itl_p99_over_p50": p99 / p50,
        "itl_max_during_prefill_ms": 1e3 * max(during) if during else None,
        "long_prompt_ttft_s": long_ttft,
    }


async def run_engine_inprocess(config: Any, loaded: Any, reqs: list[Req], concurrency: int) -> dict[str, Any]:
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


def run_batches(name: str, model: Any, reqs: list[Req], batch: int, device: Any) -> dict[str, Any]:
    """Padded, greedy `generate()` of `batch` requests at a time, each to its batch's longest max_new_tokens
    with EOS off: (a) is batches of one; (b) static batches, where only each request's own tokens are useful.
    After one short warm-up call (its first call's one-time costs are not generate()'s speed)."""
    import torch

    warm_up = torch.tensor([reqs[0].prompt_ids[:8]], device=device)
    model.generate(
        warm_up,
        attention_mask=torch.ones_like(warm_up),
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    start = time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
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
    return summarise(name, [Result(r.max_new_tokens, None, []) for r in reqs], time.perf_counter() - start)


def run_hf_continuous(model: Any, reqs: list[Req], concurrency: int) -> dict[str, Any]:
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


# Each baseline's name in the ratios, and the ratio modelserve over gRPC at the largest C must reach.
BASELINES = {
    "a": ("(a) sequential generate()", 10.0),
    "b": ("(b) static batches", 2.0),
    "c": ("(c) transformers continuous batching", 1.0),
    "d": ("(d) modelserve engine in-process", 0.9),
}


# ---- report -----------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *harness.header(report["title"], report, f"workload: {report['workload']}"),
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
    for label, key in (("Long prompt", "long_prompt"), ("Long prompt, --enforce-eager", "long_prompt_eager")):
        lp = report.get(key)
        if lp is None:
            continue
        lines += [
            "",
            f"{label}: one {lp['long_prompt_tokens']}-token prompt arrives among {lp['running_streams']} running "
            f"streams: their ITL p50 {lp['itl_p50_ms']:.1f} ms, p99 {lp['itl_p99_ms']:.1f} ms "
            f"(p99/p50 = **{lp['itl_p99_over_p50']:.2f}**, target <= 2); worst gap while it was prefilled "
            f"{fmt(lp['itl_max_during_prefill_ms'])} ms; its TTFT {fmt(lp['long_prompt_ttft_s'], 2)} s. "
            f"The same streams with no long prompt (the control): ITL p50 {fmt(lp.get('control_itl_p50_ms'))} ms, "
            f"p99 {fmt(lp.get('control_itl_p99_ms'))} ms (p99/p50 {fmt(lp.get('control_itl_p99_over_p50'), 2)}).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in a few minutes")
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None, help="requests at the largest concurrency")
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument(
        "--server-args", default="", help="extra `modelserve serve` flags, one string (not for baseline d)"
    )
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    parser.add_argument(
        "--baselines", nargs="*", choices=list(BASELINES), default=list(BASELINES), help="which baselines to run"
    )
    parser.add_argument(
        "--compare-eager",
        action="store_true",
        help="on CUDA: a second server with --enforce-eager, at the largest C, beside the CUDA-graph one",
    )
    ns = parser.parse_args()

    import torch
    from tokenizers import Tokenizer

    from modelserve.config import Config
    from modelserve.server.lifecycle import load

    torch.set_num_threads(os.cpu_count() or 1)
    path = harness.model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool = harness.clean_token_ids(tokenizer)
    top_c = max(ns.concurrency)
    n_top = ns.requests or (32 if ns.quick else 96)
    prompt_range, new_range = ((16, 256), (8, 64)) if ns.quick else ((16, 512), (8, 256))
    workload = make_workload(tokenizer, pool, n_top, 1, prompt_range, new_range)

    # modelserve over gRPC, the server its own process; then the baselines here, after it has gone.
    config = Config(model=str(path), device=ns.device, dtype=ns.dtype, max_batch_size=32)
    flags = ("--device", ns.device, "--dtype", ns.dtype, "--max-batch-size", str(config.max_batch_size))
    flags = (*flags, *shlex.split(ns.server_args))
    server = harness.start_server(harness.RESULTS, "--model", str(path), *flags, name="serving-server")
    try:
        server.wait_serving(timeout_s=600)
        runs, top, long_prompt = asyncio.run(grpc_runs(server.address, workload, ns, tokenizer, pool))
    finally:
        server.terminate(120)
    eager_long_prompt = None
    if ns.compare_eager:
        eager = harness.start_server(
            harness.RESULTS, "--model", str(path), *flags, "--enforce-eager", name="serving-server-eager"
        )
        try:
            eager.wait_serving(timeout_s=600)
            only_top = argparse.Namespace(**{**vars(ns), "concurrency": [top_c], "quick": True})
            eager_runs, _, eager_long_prompt = asyncio.run(
                grpc_runs(eager.address, workload, only_top, tokenizer, pool)
            )
        finally:
            eager.terminate(120)
        runs += [{**run, "name": f"{run['name']}, --enforce-eager"} for run in eager_runs]
    loaded = load(config)
    baselines = {}
    seq_n = min(SMALL_RUN, len(workload))
    if "a" in ns.baselines:
        name = f"(a) sequential generate(), first {seq_n} requests"
        baselines["a"] = run_batches(name, loaded.model, workload[:seq_n], 1, loaded.device)
    if "b" in ns.baselines:
        baselines["b"] = run_batches(
            f"(b) static batches of {top_c}, padded generate()", loaded.model, workload, top_c, loaded.device
        )
    if "c" in ns.baselines:
        baselines["c"] = run_hf_continuous(loaded.model, workload, top_c)
    if "d" in ns.baselines:  # last: its engine packs and fuses the model's layers in place
        baselines["d"] = asyncio.run(run_engine_inprocess(config, loaded, workload, top_c))
    runs += [baselines[key] for key in "dabc" if key in baselines]
    # modelserve over gRPC at the largest C against each baseline, and the target of that ratio.
    targets = {BASELINES[key][0]: (run, BASELINES[key][1]) for key, run in sorted(baselines.items())}
    report = {
        "title": (
            f"Serving benchmark: {ns.preset}, {ns.dtype} on {ns.device}{' (quick)' if ns.quick else ''}"
            + (f", server flags `{ns.server_args}` (not for baseline d)" if ns.server_args else "")
        ),
        **harness.run_info(ns.device, "bench.serving_bench"),
        "workload": (
            f"{n_top} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens, max_new_tokens "
            f"{new_range[0]}-{new_range[1]}, greedy, EOS off; "
            f"closed loop C={'/'.join(map(str, sorted(ns.concurrency)))}"
            f" (smaller C serve the first {2 if ns.quick else 3}C requests, at least {small_least(ns)})"
        ),
        "runs": runs,
        "ratios": {
            name: [round(top["tok_per_s"] / run["tok_per_s"], 3), target] for name, (run, target) in targets.items()
        },
        "long_prompt": long_prompt,
        "long_prompt_eager": eager_long_prompt,
    }
    table = markdown(report)
    harness.save(f"serving-{ns.preset}-{ns.device}", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"serving-{ns.preset}-{ns.device}{'-quick' if ns.quick else ''}", table)


if __name__ == "__main__":
    main()
