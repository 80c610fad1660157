"""The engine in-process: greedy equals transformers' generate(), alone or joining a
running batch; seeded sampling repeats; an abort frees the row; a preempted request
continues with no token lost or repeated; a failed CUDA-graph capture runs eagerly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from modelserve.engine.core import EngineCore
from modelserve.engine.cuda_graphs import DecodeGraphs, Replay, batch_bucket, width_bucket
from modelserve.engine.engine import Engine, EngineConfig, RequestStream
from modelserve.engine.protocol import Abort, AddRequest, StepOutput
from modelserve.engine.request import EngineClosedError, FinishReason, Request, SamplingParams, StreamEvent
from modelserve.engine.sequence import Sequence
from modelserve.engine.step_plan import StepPlan
from modelserve.models.loader import LoadedModel, load_model

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and keeps running",
    "日本語のテキスト",
    "def generate(prompt: str) -> str:",
]


# MODELSERVE_TEST_DEVICE=cuda runs these checks on a GPU (fp32, so greedy stays comparable).
DEVICE = torch.device(os.environ.get("MODELSERVE_TEST_DEVICE", "cpu"))


def _load(path: Path) -> LoadedModel:
    return load_model(str(path), DEVICE, torch.float32)


@contextlib.asynccontextmanager
async def _running(model: LoadedModel, max_batch_size: int, **kw: int) -> AsyncIterator[Engine]:
    """A started engine (256 MiB of KV unless kv_cache_bytes says otherwise), shut down afterwards."""
    config = EngineConfig(max_batch_size=max_batch_size, **{"kv_cache_bytes": 256 << 20, **kw})
    engine = Engine(model.model, model.tokenizer, model.eos_token_ids, config, model.max_sequence_length)
    engine.start(asyncio.get_running_loop())
    try:
        yield engine
    finally:
        engine.shutdown()


def _reference(model: LoadedModel, prompt_ids: list[int], n: int, min_new_tokens: int = 0) -> list[int]:
    out = model.model.generate(
        torch.tensor([prompt_ids], device=DEVICE),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=DEVICE),
        max_new_tokens=n,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        pad_token_id=model.eos_token_ids[0],
    )
    return list(out[0, len(prompt_ids) :].tolist())


async def _collect(stream: RequestStream) -> tuple[list[int], str, StreamEvent]:
    ids: list[int] = []
    text = ""
    async for event in stream:
        ids.extend(event.token_ids)
        text += event.text
        if event.finish is not None:
            return ids, text, event
    raise AssertionError("stream ended without a finish event")


def _greedy(i: int, prompt_ids: list[int], n: int) -> Request:
    return Request(f"r{i}", tuple(prompt_ids), SamplingParams(max_new_tokens=n, temperature=0.0))


class _EagerGraphs(DecodeGraphs):
    """The CUDA-graph decode path (padded buckets, static buffers) with each "replay" run eagerly: on a
    CPU it checks everything the graphs do except the recording itself."""

    def _record(self, forward: Replay) -> Replay:
        return forward


def _bucketed(core: EngineCore, graphs: type[DecodeGraphs] = _EagerGraphs) -> DecodeGraphs:
    runner = core.runner
    # Not CUDA: the same path, replayed eagerly. On CUDA the runner's own graphs stay, unless the test
    # asks for another kind (the failing capture).
    if runner.graphs is None or graphs is not _EagerGraphs:
        assert runner.kv is not None
        runner.graphs = graphs(
            runner.decoder_forward, runner.kv, core.scheduler.max_batch_size, core.max_sequence_tokens
        )
    return runner.graphs


# (arch, own_forward): GPT-2 and the Llama family run on our own forwards by default, on transformers' when off.
FORWARDS = [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]


@pytest.mark.parametrize("decode", ["eager", "bucketed"])
@pytest.mark.parametrize(("arch", "own_forward"), FORWARDS, ids=[f"{a}-{'own' if o else 'hf'}" for a, o in FORWARDS])
async def test_greedy_matches_generate_alone_and_joining_mid_flight(
    arch: str, own_forward: bool, decode: str, model_dirs: dict[str, Path]
) -> None:
    """Also through decode's CUDA-graph path (padded rows and width): greedy output must not change."""
    model = _load(model_dirs[arch])
    async with _running(model, 8, enforce_eager=decode == "eager", own_forward=own_forward) as engine:
        assert (engine.core.runner.own is not None) == own_forward
        graphs = _bucketed(engine.core) if decode == "bucketed" else None
        lengths = [24, 9, 17, 30]
        prompts = [model.encode(p) for p in PROMPTS]
        # The first request runs alone for a few steps; the others join it mid-flight.
        first = engine.submit(_greedy(0, prompts[0], lengths[0]))
        head = [await first.__anext__()]
        while sum(len(e.token_ids) for e in head) < 3:  # a few tokens (a slow reader gets them merged)
            head.append(await first.__anext__())
        others = [engine.submit(_greedy(i, prompts[i], lengths[i])) for i in range(1, len(prompts))]
        results = await asyncio.gather(_collect(first), *(_collect(s) for s in others))
        results[0] = ([t for e in head for t in e.token_ids] + results[0][0], "", results[0][2])
        for i, (ids, _, last) in enumerate(results):
            expected = _reference(model, prompts[i], lengths[i])
            assert ids == expected, f"{arch} request {i} diverged from generate()"
            assert last.finish is not None
            if len(ids) < lengths[i]:
                assert last.finish.reason is FinishReason.EOS_TOKEN
        alone = await _collect(engine.submit(_greedy(9, prompts[2], lengths[2])))
        assert alone[0] == results[2][0]
        if graphs is not None:
            assert graphs.captured >= 3, "rows 1, 2 and 4 (3 live rows padded to 4) are buckets of their own"


def test_decode_buckets() -> None:
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 32]
    assert batch_bucket(30, 24) == 24  # never more slots than the pool has
    assert [width_bucket(n, 4096) for n in (1, 256, 257, 1000, 1025, 4096)] == [256, 256, 512, 1024, 2048, 4096]
    assert width_bucket(3000, 2304) == 2304


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operation that reads a device value back to the host (a sync on a GPU)."""

    READS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("decode", ["eager", "bucketed"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_a_decode_forward_never_reads_the_device(arch: str, decode: str, model_dirs: dict[str, Path]) -> None:
    """The step's one device-to-host read is the sampler's; a read inside the forward would be a second
    sync per step, and would make the forward impossible to record into a CUDA graph."""
    model = _load(model_dirs[arch])
    core = EngineConfig(max_batch_size=8, kv_cache_bytes=16 << 20).build_core(
        model.model, model.eos_token_ids, model.max_sequence_length, observed=False
    )
    if decode == "bucketed":
        _bucketed(core)
    for i, n in enumerate((3, 7, 5)):  # three rows of different lengths
        core.apply(AddRequest(i, _greedy(i, list(range(1, n + 1)), 8)))
    while core.scheduler.prefilling or core.scheduler.waiting:
        core.step()
    forward = core.runner.forward
    reads: list[str] = []

    def watched(*args: torch.Tensor) -> torch.Tensor:  # type: ignore[misc]
        watch = _HostReads()
        with watch:
            logits = forward(*args)
        reads.extend(watch.reads)
        return logits

    core.runner.forward = watched  # type: ignore[method-assign,assignment]
    out = core.step()
    assert len([row for row in out.rows if row.token_id >= 0]) == 3  # a decode-only step of three rows
    assert reads == []


class _FailingCapture(DecodeGraphs):
    """Every capture fails, as a CUDA graph can (an op that syncs, an allocator that runs out)."""

    def _record(self, forward: Replay) -> Replay:
        raise RuntimeError("operation not permitted when stream is capturing")


async def test_a_failed_graph_capture_serves_the_request_eagerly(
    model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    model = _load(model_dirs["llama"])
    prompt = model.encode(PROMPTS[1])
    async with _running(model, 4) as engine:
        graphs = _bucketed(engine.core, _FailingCapture)
        first = await _collect(engine.submit(_greedy(0, prompt, 12)))
        second = await _collect(engine.submit(_greedy(1, prompt, 12)))
    assert first[0] == second[0] == _reference(model, prompt, 12)
    assert first[2].finish is not None and first[2].finish.reason is FinishReason.LENGTH
    assert graphs.captured == 0
    failures = [r for r in caplog.records if "capturing a CUDA graph" in r.getMessage()]
    assert len(failures) == 1, "logged once; the bucket then runs eagerly without trying again"


async def test_seeded_sampling_repeats_and_text_is_the_decoded_output(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["llama"])
    async with _running(model, 4) as engine:
        params = SamplingParams(max_new_tokens=40, temperature=1.3, top_p=0.95, top_k=100, seed=1234, ignore_eos=True)
        prompt = tuple(model.encode("Once upon a time"))
        a = await _collect(engine.submit(Request("a", prompt, params)))
        # The same request again, this time beside a different one.
        noise = engine.submit(Request("n", prompt, SamplingParams(max_new_tokens=40, temperature=2.0, seed=5)))
        b, _ = await asyncio.gather(_collect(engine.submit(Request("b", prompt, params))), _collect(noise))
        assert a[0] == b[0] and len(a[0]) == 40
        assert a[1] == model.tokenizer.decode(a[0], skip_special_tokens=True)
        assert a[2].finish is not None and a[2].finish.seed == 1234


async def test_abort_frees_the_row_at_the_next_step(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["gpt2"])
    async with _running(model, 2) as engine:
        prompt = tuple(model.encode("Hello"))
        long = engine.submit(Request("long", prompt, SamplingParams(max_new_tokens=1500, ignore_eos=True, seed=1)))
        await long.__anext__()
        long.abort()
        # Commands reach the engine in order: once this later request is done, the abort was applied.
        ids, _, last = await _collect(engine.submit(_greedy(1, list(prompt), 3)))
        assert len(ids) == 3 and last.finish is not None and last.finish.reason is FinishReason.LENGTH
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (0, 0)
        assert engine.core.blocks.used_blocks == 0 and not engine.core.has_work()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("long_chunk", [0, 3], ids=["a-chunk-a-step", "paced-3-a-step"])
async def test_chunked_prefill_matches_generate(arch: str, long_chunk: int, model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs[arch])
    # Prompts span several steps; with long_chunk 3, one over four chunks is fed 3 tokens a step beside the stream.
    async with _running(model, 4, prefill_chunk_tokens=7, long_prefill_chunk_tokens=long_chunk) as engine:
        fed: list[list[int]] = []  # each step's token count per row, [stream, prompt] while both run
        schedule = engine.core.scheduler.schedule

        def spied() -> tuple[StepPlan, list[Sequence]]:
            plan, admitted = schedule()
            fed.append([len(row.token_ids) for row in plan.rows])
            return plan, admitted

        engine.core.scheduler.schedule = spied  # type: ignore[method-assign]
        along = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)  # decodes all along
        running = engine.submit(Request("r0", tuple(model.encode(PROMPTS[0])), along))
        await running.__anext__()
        prompt = model.encode(PROMPTS[1] * 3)
        assert len(prompt) > 4 * 7
        ids, _, _ = await _collect(engine.submit(_greedy(1, prompt, 12)))
        assert ids == _reference(model, prompt, 12)
        assert (await _collect(running))[2].finish is not None
    beside = [counts[1] for counts in fed if len(counts) == 2 and counts[1] > 1]  # the prompt's chunks beside it
    assert beside and max(beside) == (3 if long_chunk else 7), fed


def _prompt_log_softmax(model: LoadedModel, prompt: list[int]) -> torch.Tensor:
    """A plain forward's log-softmax over the prompt: row p is the distribution of token p + 1."""
    with torch.inference_mode():
        logits = model.model(torch.tensor([prompt], device=DEVICE)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_prompt_logprobs_equal_a_plain_forward(arch: str, model_dirs: dict[str, Path]) -> None:
    """Chunked over several steps, beside a decoding stream, and with the prompt already in the prefix cache
    (a request that scores its prompt computes every position itself); then the output goes on as greedy."""
    model = _load(model_dirs[arch])
    prompt = model.encode(PROMPTS[1] * 3)
    expected = _prompt_log_softmax(model, prompt)
    scored = SamplingParams(max_new_tokens=6, temperature=0.0, prompt_logprobs=3)
    async with _running(model, 4, prefill_chunk_tokens=7) as engine:
        await _collect(engine.submit(_greedy(0, prompt, 2)))  # caches the prompt's full blocks
        running = engine.submit(_greedy(1, model.encode(PROMPTS[0]), 30))
        await running.__anext__()
        events = [event async for event in engine.submit(Request("scored", tuple(prompt), scored))]
        await _collect(running)
        assert engine.core.blocks.used_blocks == 0
    first = events[0]
    assert [entry.chosen.token_id for entry in first.prompt_logprobs] == prompt[1:]
    assert all(not event.prompt_logprobs for event in events[1:])
    assert first.cached_tokens == 0
    for p, entry in enumerate(first.prompt_logprobs):
        row = expected[p]
        assert entry.chosen.logprob == pytest.approx(float(row[prompt[p + 1]]), abs=1e-4)
        assert entry.chosen.rank == int((row > row[prompt[p + 1]]).sum()) + 1
        assert [t.token_id for t in entry.top] == row.topk(3).indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert [t for e in events for t in e.token_ids] == _reference(model, prompt, 6)


async def test_a_preempted_request_continues_with_nothing_lost_or_repeated(model_dirs: dict[str, Path]) -> None:
    """Two requests that each grow to the whole KV budget run together until the blocks run out; the newer
    is preempted (its blocks freed) and recomputed later. Both streams equal what they give alone: greedy
    equals generate(), and a seeded sampled one draws on from where it stopped."""
    model = _load(model_dirs["llama"])
    async with _running(model, 4) as probe:
        per_token = probe.core.runner.kv_shape.bytes_per_token
    budget = 320  # tokens: 20 blocks of 16, one whole sequence
    prompt = model.encode("Hello")
    new = budget - len(prompt)
    sampled = SamplingParams(max_new_tokens=new, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    async with _running(model, 4, kv_cache_bytes=budget * per_token) as engine:
        assert engine.max_sequence_tokens == budget
        alone = await _collect(engine.submit(Request("alone", tuple(prompt), sampled)))
        greedy = engine.submit(_greedy(0, prompt, new))
        head = await greedy.__anext__()
        beside = engine.submit(Request("beside", tuple(prompt), sampled))
        greedy_done, beside_done = await asyncio.gather(_collect(greedy), _collect(beside))
        preempted = engine.core.scheduler.preemptions
        assert engine.core.blocks.used_blocks == 0 and not engine.core.has_work()
    assert preempted >= 1, "the budget holds one whole sequence: two must not both run to the end at once"
    assert beside_done[0] == alone[0] and len(alone[0]) == new
    assert [*head.token_ids, *greedy_done[0]] == _reference(model, prompt, new)


async def test_rows_are_reused_and_memory_stays_bounded(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["gpt2"])
    async with _running(model, 4) as engine:
        prompt = tuple(model.encode("Hello there"))
        kv = engine.core.runner.kv
        assert kv is not None
        address = kv.keys[0].data_ptr()

        async def wave(seed: int) -> None:
            streams = [
                engine.submit(Request(f"{seed}-{i}", prompt, SamplingParams(max_new_tokens=5 + i, seed=seed + i)))
                for i in range(12)
            ]
            await asyncio.gather(*(_collect(s) for s in streams))

        for seed in range(4):
            await wave(seed * 100)
            assert engine.core.blocks.used_blocks == 0 and not engine.core.has_work()
        assert kv.keys[0].data_ptr() == address  # the KV memory is taken once, never regrown
        assert len(engine.core.runner.states) == 0  # every request's sampling state went with it


async def test_a_closed_engine_refuses_new_requests(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["gpt2"])
    async with _running(model, 2) as engine:
        assert engine.alive
    assert not engine.alive
    with pytest.raises(EngineClosedError):
        engine.submit(_greedy(0, model.encode("Hello"), 2))


async def test_a_stop_sequence_costs_the_core_at_most_one_extra_step(model_dirs: dict[str, Path]) -> None:
    """The frontend finds the stop string and aborts the row; however far the frontend lags (its event loop
    is kept busy here), the core runs at most one step past the token that completed the stop."""
    model = _load(model_dirs["llama"])
    prompt = tuple(model.encode("The quick brown fox"))
    free_params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)  # varied text
    async with _running(model, 2) as engine:
        free_ids, free_text, _ = await _collect(engine.submit(Request("free", prompt, free_params)))
        # A stop string that first appears in the text after the 12th token.
        start = len(model.tokenizer.decode(free_ids[:12]))
        stop = next(
            free_text[p : p + 3]
            for p in range(start, len(free_text) - 3)
            if free_text.find(free_text[p : p + 3]) == p and "\ufffd" not in free_text[p : p + 3]
        )

        produced: dict[int, int] = {}
        real_step = engine.core.step

        def counting_step() -> StepOutput:
            out = real_step()
            for row in out.rows:
                if row.token_id >= 0:
                    produced[row.key] = produced.get(row.key, 0) + 1
            return out

        engine.core.step = counting_step  # type: ignore[method-assign]
        params = dataclasses.replace(free_params, stop=(stop,))
        stream = engine.submit(Request("stopped", prompt, params))

        async def keep_the_loop_busy() -> None:
            while True:
                time.sleep(0.02)  # noqa: ASYNC251  (blocking on purpose: the frontend falls behind the core)
                await asyncio.sleep(0)

        busy = asyncio.ensure_future(keep_the_loop_busy())
        try:
            ids, text, last = await _collect(stream)
        finally:
            busy.cancel()
        assert last.finish is not None and last.finish.reason is FinishReason.STOP_SEQUENCE
        assert stop not in text and free_text.startswith(text) and 12 <= len(ids) < 40
        # The abort went to the core before this request: once this one is done, so is the stopped row.
        await _collect(engine.submit(Request("after", prompt, dataclasses.replace(free_params, max_new_tokens=1))))
        key = min(produced)
        assert len(ids) <= produced[key] <= len(ids) + 1, (len(ids), produced[key])


def test_requests_hold_the_memory_they_use_not_what_they_may_use(model_dirs: dict[str, Path]) -> None:
    """Sixteen requests for 1,000 new tokens each all start at once in a KV budget of 1,024 tokens: a
    request takes blocks as it grows, not prompt + max_new_tokens up front. Aborted, they give all back."""
    model = _load(model_dirs["llama"])
    per_token = 512  # the tiny Llama's KV bytes per token (tests/conftest.py: KV_BYTES_PER_TOKEN)
    core = EngineConfig(max_batch_size=16, kv_cache_bytes=1024 * per_token).build_core(
        model.model, model.eos_token_ids, model.max_sequence_length, observed=False
    )
    assert core.kv_budget_tokens == 1024
    params = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    for key in range(16):
        core.apply(AddRequest(key, Request(str(key), (5 + key, 6, 7, 8), params)))
    out = core.step()
    assert sorted(row.key for row in out.rows if row.token_id >= 0) == list(range(16))
    assert core.stats().running == 16 and core.stats().waiting == 0
    assert core.blocks.used_blocks == 16  # one block each, for prompt and first tokens
    for _ in range(3):
        assert len([row for row in core.step().rows if row.token_id >= 0]) == 16
    for key in range(16):
        core.apply(Abort(key, FinishReason.CANCELLED))
    ended = core.step()
    assert sorted(row.key for row in ended.rows if row.finish is FinishReason.CANCELLED) == list(range(16))
    assert core.blocks.used_blocks == 0 and not core.has_work() and len(core.runner.states) == 0


def test_cpu_kv_memory_is_zero_and_becomes_resident_only_as_it_is_written() -> None:
    """A CPU KV budget is mapped, not zeroed up front: 2 GiB of it adds almost nothing to the process's
    memory until blocks are written, reads as zeros (a gather's padded columns must not be NaN), and the
    block records are made as blocks are taken."""
    import psutil

    from modelserve.engine.block_manager import BlockManager, BlockTable
    from modelserve.engine.kv_memory import KVMemory, KVShape, memory_warning

    me = psutil.Process()
    shape = KVShape(n_layers=4, kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    block_size = 16
    num_blocks = (2 << 30) // (shape.bytes_per_token * block_size)
    before = me.memory_info().rss
    kv = KVMemory(shape, num_blocks, block_size)
    blocks = BlockManager(num_blocks, block_size)
    assert me.memory_info().rss - before < 64 << 20
    assert not blocks.blocks
    table = BlockTable()
    blocks.allocate(table, 3 * block_size)
    assert len(blocks.blocks) == 3 and blocks.used_blocks == 3 and blocks.free_blocks == num_blocks - 3
    for layer in (*kv.keys, *kv.values):
        assert not layer[:: 4096 * block_size].any() and not layer[-block_size:].any()
        layer[: 3 * block_size] = 1.0
    assert me.memory_info().rss - before < 64 << 20
    assert memory_warning(1 << 20, shape.device) is None
    assert "--kv-cache-bytes" in (memory_warning(psutil.virtual_memory().total * 2, shape.device) or "")


def test_the_kv_warning_names_a_cgroup_memory_limit_below_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container whose memory limit (read from its cgroup; stood in for here) is below the KV budget, the
    start-up warning says so: the host's free memory alone would not, and the pool would be OOM-killed under load."""
    from modelserve.engine import kv_memory

    cpu = torch.device("cpu")
    monkeypatch.setattr(kv_memory, "cgroup_memory_limit", lambda: 1 << 30)
    warning = kv_memory.memory_warning(2 << 30, cpu) or ""
    assert "cgroup's memory limit (1.00 GiB)" in warning and "--kv-cache-bytes" in warning
    assert kv_memory.memory_warning(512 << 20, cpu) is None
    assert kv_memory.memory_warning(2 << 30, torch.device("meta")) is None  # on a GPU the memory is taken at start


LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
ON_CPU = pytest.mark.skipif(DEVICE.type != "cpu", reason="a GPU's KV memory is zeroed, all of it, at start")


@LINUX_ONLY
def test_cpu_kv_memory_fill_faults_pages_in_and_keeps_what_they_hold() -> None:
    """fill() makes the pages of the blocks it is given resident (no step then stops for the kernel to zero
    them), leaves blocks already written as they were, and goes no further than the budget."""
    import psutil

    from modelserve.engine.kv_memory import KVMemory, KVShape

    me = psutil.Process()
    shape = KVShape(n_layers=4, kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    block_size = 16
    block_bytes = shape.bytes_per_token * block_size  # all layers' keys and values
    num_blocks = (256 << 20) // block_bytes
    kv = KVMemory(shape, num_blocks, block_size)
    for layer in (*kv.keys, *kv.values):
        layer[: 3 * block_size] = 1.0
    assert kv.filled_blocks == 0
    before = me.memory_info().rss
    half = num_blocks // 2
    kv.fill(half)
    assert kv.filled_blocks == half
    assert me.memory_info().rss - before >= 0.9 * half * block_bytes
    kv.fill(num_blocks * 2)
    assert kv.filled_blocks == num_blocks
    assert me.memory_info().rss - before >= 0.9 * num_blocks * block_bytes
    for layer in (*kv.keys, *kv.values):  # read after the memory figures: reading a page makes it resident too
        assert bool((layer[: 3 * block_size] == 1.0).all()) and not layer[3 * block_size :].any()


@LINUX_ONLY
@ON_CPU
def test_an_idle_core_fills_kv_memory_ahead_of_use_but_not_the_whole_budget(
    model_dirs: dict[str, Path],
) -> None:
    """With nothing to step, the core faults in KV memory a little at a time until a share of the budget
    (FILL_AHEAD_FRACTION) beyond the blocks used so far is resident; a request moves that window on. A request
    that arrives meanwhile is served as usual."""
    from modelserve.engine.core import FILL_AHEAD_FRACTION

    model = _load(model_dirs["llama"])

    async def until_filled(engine: Engine) -> int:
        core, kv = engine.core, engine.core.runner.kv
        assert kv is not None
        deadline = time.monotonic() + 30
        while core.can_fill():
            assert time.monotonic() < deadline, f"filled {kv.filled_blocks} blocks of {core.blocks.num_blocks}"
            await asyncio.sleep(0.01)
        return kv.filled_blocks

    async def main() -> None:
        async with _running(model, 4) as engine:
            blocks = engine.core.blocks
            ahead = int(blocks.num_blocks * FILL_AHEAD_FRACTION)
            assert 0 < ahead < blocks.num_blocks
            prompt = model.tokenizer.encode(PROMPTS[1]).ids
            ids, _, _ = await _collect(engine.submit(_greedy(0, prompt, 8)))
            assert ids == _reference(model, prompt, 8)
            assert await until_filled(engine) == blocks.touched_blocks + ahead
            touched = blocks.touched_blocks
            await asyncio.gather(*(_collect(engine.submit(_greedy(i, prompt, 300))) for i in range(1, 4)))
            assert blocks.touched_blocks > touched
            assert await until_filled(engine) == min(blocks.num_blocks, blocks.touched_blocks + ahead)

    asyncio.run(main())


@LINUX_ONLY
@ON_CPU
def test_a_kernel_that_cannot_fill_kv_memory_ahead_leaves_it_to_the_steps(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where madvise(MADV_POPULATE_WRITE) fails (a kernel before 5.14 says EINVAL), the core says so once and
    stops filling for good: it does not retry in a loop, and requests are served as before."""
    import errno

    from modelserve.engine import kv_memory

    calls = 0

    def cannot(address: int, length: int) -> None:
        nonlocal calls
        calls += 1
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(kv_memory, "_populate", cannot)
    model = _load(model_dirs["llama"])

    async def main() -> None:
        async with _running(model, 4) as engine:
            prompt = model.tokenizer.encode(PROMPTS[1]).ids
            for i in range(2):
                ids, _, _ = await _collect(engine.submit(_greedy(i, prompt, 8)))
                assert ids == _reference(model, prompt, 8)
            assert not engine.core.can_fill() and engine.core.blocks.touched_blocks > 0

    with caplog.at_level("INFO", logger="modelserve.engine.core"):
        asyncio.run(main())
    assert calls == 1
    assert [r.getMessage() for r in caplog.records if "faulted in" in r.getMessage()] == [
        "KV memory is faulted in as steps first write it: this kernel cannot do it ahead"
    ]
