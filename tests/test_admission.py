"""The engine in-process under pressure: a bounded queue, priorities, deadlines that drop
waiting requests without touching the model, deadlines judged impossible at admission, and a
step that runs out of memory failing only its requests and lowering the batch size."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from modelserve.engine.engine import RequestStream
from modelserve.engine.request import (
    DeadlineUnreachableError,
    FinishReason,
    QueueFullError,
    Request,
    SamplingParams,
)
from modelserve.models.loader import LoadedModel
from tests.test_engine import _collect, _load, _running

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


def _blocker(model: LoadedModel) -> Request:
    """A request that holds the engine's only row until it is aborted."""
    params = SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True)
    return Request("blocker", tuple(model.encode("Hello")), params)


@pytest.fixture(scope="module")
def llama(model_dirs: dict[str, Path]) -> LoadedModel:
    return _load(model_dirs["llama"])


async def test_a_full_queue_refuses_at_once_and_admitted_requests_finish(llama: LoadedModel) -> None:
    async with _running(llama, 1, max_waiting_requests=2) as engine:
        blocker = engine.submit(_blocker(llama))
        await blocker.__anext__()  # it holds the row: what follows waits
        prompt = tuple(llama.encode("Hi there"))
        waiting = [engine.submit(Request(f"w{i}", prompt, GREEDY)) for i in range(2)]
        with pytest.raises(QueueFullError, match=r"2 requests are waiting; the limit is 2.*retry in about") as info:
            engine.submit(Request("refused", prompt, GREEDY))
        assert 0 < info.value.retry_after_s <= 30
        assert engine._admission.waiting() == (2, 2 * len(prompt))  # their prompt tokens
        blocker.abort()
        for stream in waiting:
            ids, _, last = await _collect(stream)
            assert last.finish is not None and last.finish.reason is FinishReason.LENGTH and len(ids) == 4
        assert engine._admission.waiting() == (0, 0)
        # The queue has room again.
        assert (await _collect(engine.submit(Request("after", prompt, GREEDY))))[2].finish is not None


async def test_the_token_limit_counts_the_prompt_tokens_waiting(llama: LoadedModel) -> None:
    """A waiting request needs KV blocks for its prompt to start; max_new_tokens is taken as it grows."""
    async with _running(llama, 1, max_waiting_tokens=100) as engine:
        blocker = engine.submit(_blocker(llama))
        await blocker.__anext__()
        long = SamplingParams(max_new_tokens=1000, temperature=0.0)
        first = engine.submit(Request("fits", tuple(range(5, 65)), long))  # 60 of 100 prompt tokens
        second = engine.submit(Request("fits too", tuple(range(5, 35)), long))  # 90 of 100, whatever its output
        with pytest.raises(QueueFullError, match=r"90 prompt tokens are waiting and this request has 20; the limit"):
            engine.submit(Request("over", tuple(range(5, 25)), SamplingParams(max_new_tokens=1)))
        blocker.abort()
        first.abort()
        second.abort()
        for stream in (first, second):
            assert (await _collect(stream))[2].finish is not None


async def test_higher_priority_is_admitted_first_and_equal_priority_in_arrival_order(llama: LoadedModel) -> None:
    async with _running(llama, 1) as engine:
        blocker = engine.submit(_blocker(llama))
        await blocker.__anext__()
        prompt = tuple(llama.encode("Hi"))
        order = [("low", -5), ("mid-a", 0), ("high", 7), ("mid-b", 0), ("top", 1000)]
        finished: list[str] = []

        async def run(name: str, stream: RequestStream) -> None:
            await _collect(stream)
            finished.append(name)

        # All five are queued before the blocker is aborted: commands reach the engine in order.
        streams = [(name, engine.submit(Request(name, prompt, GREEDY, priority=p))) for name, p in order]
        blocker.abort()
        await asyncio.gather(*(run(name, stream) for name, stream in streams))
        # One row: each runs alone, so they finish in the order they were admitted.
        assert finished == ["top", "high", "mid-a", "mid-b", "low"]


async def test_an_expired_waiting_request_is_dropped_without_touching_the_model(llama: LoadedModel) -> None:
    async with _running(llama, 1) as engine:
        blocker = engine.submit(_blocker(llama))
        await blocker.__anext__()
        prompt = tuple(llama.encode("Hi"))
        doomed = engine.submit(Request("doomed", prompt, GREEDY, deadline_s=time.monotonic() + 0.2))
        ids, _, last = await _collect(doomed)
        assert last.finish is not None and last.finish.reason is FinishReason.DEADLINE_EXCEEDED
        assert ids == [] and last.output_tokens == 0
        # Never scheduled: its queue time is its whole life.
        assert last.finish.timings.queue_s == last.finish.timings.total_s
        assert engine._admission.waiting() == (0, 0)
        blocker.abort()


async def test_an_expired_running_request_stops_and_frees_its_row(llama: LoadedModel) -> None:
    async with _running(llama, 2) as engine:
        params = SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True)
        # 1,900 tokens take this engine several seconds; the deadline passes long before.
        stream = engine.submit(Request("r", tuple(llama.encode("Hi")), params, deadline_s=time.monotonic() + 1.0))
        ids, _, last = await _collect(stream)
        assert last.finish is not None and last.finish.reason is FinishReason.DEADLINE_EXCEEDED
        # It was admitted (it ran, however few tokens a loaded machine gave it) and stopped early.
        assert last.finish.timings.queue_s < last.finish.timings.total_s and len(ids) < 1900
        # The row went back in the step that ended the request.
        assert (
            engine.stats().running == 0 and engine.core.blocks.used_blocks == 0 and engine.stats().kv_tokens_used == 0
        )


async def test_a_deadline_the_queue_makes_impossible_is_refused_at_admission(llama: LoadedModel) -> None:
    async with _running(llama, 1) as engine:
        long_prompt = tuple(llama.encode("the quick brown fox " * 60))
        assert len(long_prompt) >= 200
        # One prefill teaches the engine its prefill speed.
        await _collect(engine.submit(Request("teach", long_prompt, GREEDY)))
        blocker = engine.submit(_blocker(llama))
        await blocker.__anext__()
        queued = [engine.submit(Request(f"q{i}", long_prompt, GREEDY)) for i in range(3)]
        with pytest.raises(DeadlineUnreachableError, match=r"prompt tokens are queued ahead"):
            engine.submit(Request("hopeless", long_prompt, GREEDY, deadline_s=time.monotonic() + 1e-4))
        # Work queued at a lower priority is not ahead of it; a generous deadline is accepted.
        low = engine.submit(Request("low", long_prompt, GREEDY, priority=-1))
        fine = engine.submit(Request("fine", long_prompt, GREEDY, deadline_s=time.monotonic() + 600))
        blocker.abort()
        for stream in (*queued, low, fine):
            assert (await _collect(stream))[2].finish is not None


async def test_out_of_memory_fails_the_step_and_halves_the_batch(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _running(llama, 4) as engine:
        prompt = tuple(llama.encode("Hi"))
        params = SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True)
        streams = [engine.submit(Request(f"r{i}", prompt, params)) for i in range(4)]
        for stream in streams:
            await stream.__anext__()
        real_forward = engine.core.runner.forward

        def forward_out_of_memory(*args: object, **kwargs: object) -> torch.Tensor:
            monkeypatch.setattr(engine.core.runner, "forward", real_forward)  # fail once
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

        monkeypatch.setattr(engine.core.runner, "forward", forward_out_of_memory)
        ends = await asyncio.gather(*(_collect(s) for s in streams))
        for _, _, last in ends:
            assert last.finish is not None and last.finish.reason is FinishReason.OUT_OF_MEMORY
            assert "out of memory in a decode step" in last.finish.error
            assert "batch size is now at most 2" in last.finish.error
        assert engine.stats().max_batch_size == 2 and engine.core.blocks.used_blocks == 0
        # The engine goes on, at the lower batch size.
        again = [engine.submit(Request(f"a{i}", prompt, GREEDY)) for i in range(3)]
        for _, _, last in await asyncio.gather(*(_collect(s) for s in again)):
            assert last.finish is not None and last.finish.reason is FinishReason.LENGTH
        assert engine.stats().max_batch_size == 2
