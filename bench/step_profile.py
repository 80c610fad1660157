"""Where an engine step's time goes: bare transformers decode vs our runner's forward, a whole step.

Loads a bench preset's random-weight model (bench.harness.model_dir) as the server loads it and
times, at each batch size: a transformers DynamicCache decode step, our runner's forward of a
decode-only step plan (paged attention over the block tables), and one whole engine-core step in
steady decode (scheduling, the plan, the forward, sampling, the step's output message: everything
the core does per token), on CUDA also both with the decode replayed from CUDA graphs; then one
whole step that prefills a burst of prompts together (--prefill-prompts of --prefill-len tokens,
what a burst of requests costs before its first tokens); then a step of --chunk-rows decoding rows
with and without a 128-token prompt chunk after --chunk-after tokens (what a long prompt arriving costs
the running streams); then prints the torch profiler's top ops for a few whole decode steps. For
finding regressions and device-specific costs.

    python -m bench.step_profile --preset gpt2-small --device cpu
    python -m bench.step_profile --preset llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.harness import CACHE_DIR, PRESETS, model_dir, pct

if TYPE_CHECKING:
    from modelserve.engine.core import EngineCore


def once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn`, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median milliseconds of `fn` over `repeat` runs, after one warm-up."""
    fn()
    return pct([once_ms(fn, device) for _ in range(repeat)], 0.5)


def kv_cache_bytes(model: torch.nn.Module) -> int:
    """The KV budget of each core made here: on a GPU, 0 would take most of its free memory for each of them."""
    return 2 << 30 if next(model.parameters()).device.type == "cuda" else 0


def prefilling(core: EngineCore) -> bool:
    """Are prompts still waiting or being prefilled?"""
    return bool(core.scheduler.prefilling or core.scheduler.waiting)


def request_adder(core: EngineCore, model: torch.nn.Module) -> Callable[..., tuple[int, ...]]:
    """`add(n, new_tokens, prefix=())`: a greedy request of `prefix` then `n` random ids (so nothing but the
    prefix can be cached) to `core`; returns its prompt."""
    from modelserve.engine.protocol import AddRequest
    from modelserve.engine.request import Request, SamplingParams

    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)
    keys = itertools.count()

    def add(n: int, new_tokens: int, prefix: tuple[int, ...] = ()) -> tuple[int, ...]:
        ids = prefix + tuple(torch.randint(vocab, (n,), generator=generator).tolist())
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        key = next(keys)
        core.apply(AddRequest(key, Request(str(key), ids, params)))
        return ids

    return add


def decoding_core(model: torch.nn.Module, batch: int, context: int, steps: int, cuda_graphs: bool) -> EngineCore:
    """An engine core with `batch` greedy rows decoding after a `context`-token prompt each, `steps` tokens to
    go. Each row's prompt is its own random ids: rows with one prompt would share its cached blocks, and their
    attention would read one row's keys from the cache instead of every row's from memory."""
    from modelserve.engine.engine import EngineConfig

    config = EngineConfig(
        max_batch_size=batch,
        kv_cache_bytes=kv_cache_bytes(model),
        prefill_chunk_tokens=batch * context,
        enforce_eager=not cuda_graphs,
    )
    core = config.build_core(model, (), context + steps + 8, observed=False)
    add = request_adder(core, model)
    for _ in range(batch):
        add(context, steps)
    while prefilling(core):  # prefill every prompt first
        core.step()
    return core


def engine_step_ms(
    model: torch.nn.Module, batch: int, context: int, repeat: int, device: torch.device, cuda_graphs: bool = False
) -> float:
    """Median milliseconds of EngineCore.step() with `batch` greedy rows decoding after a `context`-token prompt."""
    core = decoding_core(model, batch, context, 4 * repeat + 8, cuda_graphs)
    core.step()  # with graphs, this step captures the bucket; the timed ones replay it
    return timed(core.step, device, repeat)


def prefill_step_ms(model: torch.nn.Module, prompts: int, length: int, repeat: int, device: torch.device) -> float:
    """Median milliseconds of the one EngineCore.step() that prefills `prompts` new prompts of `length`
    tokens (random ids, so no prefix is cached), with nothing else running."""
    from modelserve.engine.engine import EngineConfig

    config = EngineConfig(
        max_batch_size=prompts,
        kv_cache_bytes=kv_cache_bytes(model),
        prefill_chunk_tokens=length,
        max_num_batched_tokens=prompts * length,
        enforce_eager=True,
    )
    core = config.build_core(model, (), length + 8, observed=False)
    add = request_adder(core, model)
    samples = []
    for i in range(repeat + 1):  # the first is a warm-up
        for _ in range(prompts):
            add(length, 1)
        ms = once_ms(core.step, device)  # every prompt fits the step's budget: this step is the whole prefill
        if i:
            samples.append(ms)
        while core.has_work():
            core.step()
    return pct(samples, 0.5)


def chunk_step_ms(
    model: torch.nn.Module, rows: int, start: int, chunk: int, repeat: int, device: torch.device
) -> tuple[float, float]:
    """Median milliseconds of a decode-only step of `rows` greedy rows, and of the same rows' step that also
    carries a `chunk`-token prompt chunk after `start` tokens of its prompt (a long prompt arriving among
    running streams). The earlier tokens come from the prefix cache, so each timed step is exactly one chunk
    at that depth; the two kinds alternate."""
    from modelserve.engine.engine import EngineConfig

    config = EngineConfig(
        max_batch_size=rows + 1, kv_cache_bytes=kv_cache_bytes(model), prefill_chunk_tokens=chunk, enforce_eager=True
    )
    steps = start // chunk + 2 * repeat + 8
    core = config.build_core(model, (), start + chunk + steps + 40, observed=False)
    add = request_adder(core, model)
    for _ in range(rows):
        add(32, steps)
    long_prefix = add(start, 1)  # prefilled (and cached) while the rows decode
    while prefilling(core):
        core.step()
    decode: list[float] = []
    carrying: list[float] = []
    for i in range(repeat + 1):
        for samples, prompt in ((decode, False), (carrying, True)):
            if prompt:
                add(chunk, 1, long_prefix)
            ms = once_ms(core.step, device)
            if i:  # the first of each is a warm-up
                samples.append(ms)
            if prefilling(core):
                raise RuntimeError(
                    "the prompt was not served from the prefix cache: more than one chunk was left "
                    "(is --chunk-after a multiple of the KV block size?)"
                )
    return pct(decode, 0.5), pct(carrying, 0.5)


def forward_ms(core: EngineCore, device: torch.device, repeat: int) -> float:
    """Median milliseconds of the runner's forward alone, within steady decode steps."""
    forward = core.runner.forward
    samples: list[float] = []

    def timed_forward(*args: Any) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = forward(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
        return logits

    core.runner.forward = timed_forward  # type: ignore[method-assign,assignment]
    for _ in range(repeat + 1):
        core.step()
    core.runner.forward = forward  # type: ignore[method-assign]
    return pct(samples[1:], 0.5)


def main() -> None:
    from transformers import DynamicCache

    from modelserve.models.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=256, help="tokens already in each row's cache")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefill-prompts", type=int, default=16, help="prompts prefilled in one step (0: skip)")
    parser.add_argument("--prefill-len", type=int, default=128, help="tokens of each of those prompts")
    parser.add_argument(
        "--chunk-after", type=int, default=1920, help="tokens before the timed chunk: a KV block multiple, 0 skips"
    )
    parser.add_argument("--chunk-rows", type=int, default=16, help="rows decoding beside that chunk")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ns = parser.parse_args()

    device, dtype = torch.device(ns.device), getattr(torch, ns.dtype)
    model = load_model(str(model_dir(ns.preset, ns.cache_dir)), device, dtype).model
    steps = 4 * ns.repeat + 8
    print(f"{ns.preset} {ns.dtype} on {device}, {ns.context} tokens of context per row")
    print("| batch | transformers decode ms | our forward ms | with CUDA graphs ms | engine step ms | with graphs ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for batch in ns.batch:
            cache = DynamicCache(config=model.config)
            ids = torch.ones((batch, ns.context), dtype=torch.long, device=device)
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

            def hf_step(cache: DynamicCache = cache, batch: int = batch) -> None:
                cache.crop(-1)
                model(input_ids=torch.ones((batch, 1), dtype=torch.long, device=device), cache=cache, use_cache=True)

            hf_ms = timed(hf_step, device, ns.repeat)
            our_ms = forward_ms(decoding_core(model, batch, ns.context, steps, cuda_graphs=False), device, ns.repeat)
            step_ms = engine_step_ms(model, batch, ns.context, ns.repeat, device)
            graph_ms = graph_step_ms = "-"
            if device.type == "cuda":  # the warm-up step captures this bucket; the timed ones replay it
                graphs = decoding_core(model, batch, ns.context, steps, cuda_graphs=True)
                graph_ms = f"{forward_ms(graphs, device, ns.repeat):.1f}"
                graph_step_ms = f"{engine_step_ms(model, batch, ns.context, ns.repeat, device, True):.2f}"
                del graphs
            gc.collect()  # each core's KV memory goes before the next is made
            row = f"| {batch} | {hf_ms:.1f} | {our_ms:.1f} | {graph_ms} | {step_ms:.2f} | {graph_step_ms} |"
            print(row, flush=True)
        if ns.prefill_prompts:
            burst = prefill_step_ms(model, ns.prefill_prompts, ns.prefill_len, ns.repeat, device)
            gc.collect()
            burst_label = f"{ns.prefill_prompts} prompts of {ns.prefill_len} tokens"
            print(f"one step prefilling {burst_label}: {burst:.1f} ms", flush=True)
        if ns.chunk_after:
            decode_ms, carrying_ms = chunk_step_ms(model, ns.chunk_rows, ns.chunk_after, 128, ns.repeat, device)
            gc.collect()
            print(
                f"{ns.chunk_rows} rows decoding: a step {decode_ms:.2f} ms; with a 128-token prompt chunk after "
                f"{ns.chunk_after} tokens {carrying_ms:.2f} ms ({carrying_ms / decode_ms:.2f}x)",
                flush=True,
            )
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        core = decoding_core(model, ns.batch[-1], ns.context, 8, cuda_graphs=False)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                core.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
