"""Where an engine step's time goes: bare transformers decode vs our runner, the sampler, a whole step.

Loads a bench preset's random-weight model (bench.harness.model_dir) as the server loads it and
times, at each batch size: a transformers DynamicCache decode step, our runner's decode step on the
KV pool, sampling, and one whole engine-core step in steady decode (scheduling, decode, sampling,
the step's output message: everything the core does per token); then prints the torch profiler's
top ops for one of our decode steps. For finding regressions and device-specific costs.

    python -m bench.step_profile --preset gpt2-small --device cpu
    python -m bench.step_profile --preset llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.harness import CACHE_DIR, PRESETS, model_dir, pct


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median milliseconds of `fn` over `repeat` runs, after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
    return pct(samples, 0.5)


def engine_step_ms(model: torch.nn.Module, batch: int, context: int, repeat: int, device: torch.device) -> float:
    """Median milliseconds of EngineCore.step() with `batch` greedy rows decoding after a `context`-token prompt."""
    from modelserve.engine.engine import EngineConfig
    from modelserve.engine.protocol import AddRequest
    from modelserve.engine.request import Request, SamplingParams

    steps = 4 * repeat + 8
    config = EngineConfig(max_batch_size=batch, kv_cache_bytes=0, prefill_chunk_tokens=batch * context)
    core = config.build_core(model, (), context + steps + 8, observed=False)
    params = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    for key in range(batch):
        core.apply(AddRequest(key, Request(str(key), (1,) * context, params)))
    while len(core.scheduler.running) < batch:  # prefill every prompt first
        core.step()
    return timed(core.step, device, repeat)


def main() -> None:
    from transformers import DynamicCache

    from modelserve.engine.kv_cache import KVPool, PrefillBuffer
    from modelserve.engine.request import SamplingParams
    from modelserve.engine.runner import ModelRunner
    from modelserve.engine.sampler import SamplingRow, sample
    from modelserve.models.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=256, help="tokens already in each row's cache")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ns = parser.parse_args()

    device, dtype = torch.device(ns.device), getattr(torch, ns.dtype)
    model = load_model(str(model_dir(ns.preset, ns.cache_dir)), device, dtype).model
    runner = ModelRunner(model)  # eager, as --enforce-eager
    graphs = ModelRunner(model, cuda_graphs=True) if device.type == "cuda" else None
    print(f"{ns.preset} {ns.dtype} on {device}, {ns.context} tokens of context per row")
    print("| batch | transformers decode ms | our decode ms | with CUDA graphs ms | sample ms | whole engine step ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for batch in ns.batch:
            cache = DynamicCache(config=model.config)
            ids = torch.ones((batch, ns.context), dtype=torch.long, device=device)
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

            def hf_step(cache: DynamicCache = cache, batch: int = batch) -> None:
                cache.crop(-1)
                model(input_ids=torch.ones((batch, 1), dtype=torch.long, device=device), cache=cache, use_cache=True)

            headroom = 3 * ns.repeat + 16  # every timed step adds a column
            pool = KVPool(runner.kv_shape, batch * (ns.context + headroom), batch, ns.context + headroom)
            for _ in range(batch):
                buffer = PrefillBuffer(runner.kv_shape, ns.context)
                buffer.past = ns.context
                pool.add(buffer, ns.context + headroom, torch.tensor(1, device=device))
            next_tokens = torch.ones(batch, dtype=torch.long, device=device)

            def our_step(pool: KVPool = pool, next_tokens: torch.Tensor = next_tokens) -> torch.Tensor:
                logits = runner.decode(pool)
                pool.end_decode(next_tokens)
                return logits

            logits = our_step()
            rows = [
                SamplingRow(SamplingParams(max_new_tokens=8, temperature=0.0), torch.Generator(), (), frozenset())
                for _ in range(batch)
            ]
            hf_ms = timed(hf_step, device, ns.repeat)
            our_ms = timed(our_step, device, ns.repeat)
            graph_ms = "-"
            if graphs is not None:

                def graph_step(
                    pool: KVPool = pool, next_tokens: torch.Tensor = next_tokens, graphs: ModelRunner = graphs
                ) -> torch.Tensor:
                    logits = graphs.decode(pool)  # the warm-up call captures this bucket; the timed ones replay it
                    pool.end_decode(next_tokens)
                    return logits

                graph_ms = f"{timed(graph_step, device, ns.repeat):.1f}"
            sample_ms = timed(functools.partial(sample, logits, rows), device, ns.repeat)
            step_ms = engine_step_ms(model, batch, ns.context, ns.repeat, device)
            print(f"| {batch} | {hf_ms:.1f} | {our_ms:.1f} | {graph_ms} | {sample_ms:.2f} | {step_ms:.2f} |")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                our_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
