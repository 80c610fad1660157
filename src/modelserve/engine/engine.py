"""The engine loop: schedule -> prefill/decode -> sample -> detokenize -> emit.

The model runs on one dedicated thread so the asyncio event loop (and every
gRPC stream on it) never waits for a forward pass. Requests and aborts reach
the thread through a queue; events go back to each request's asyncio.Queue
with one `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from modelserve.config import (
    AUTO_PREFILL_CHUNK_CPU,
    AUTO_PREFILL_CHUNK_CUDA,
    AUTO_WAITING_KV_BUDGETS,
    DEFAULT_CPU_KV_BYTES,
    Config,
)
from modelserve.engine.admission import AdmissionControl, QueueLimits
from modelserve.engine.detokenizer import IncrementalDetokenizer
from modelserve.engine.kv_cache import KVPool, PrefillBuffer
from modelserve.engine.request import (
    EngineClosedError,
    EngineStats,
    Finish,
    FinishReason,
    Request,
    StepRecord,
    StreamEvent,
    Timings,
    TokenLogprob,
    TokenLogprobs,
)
from modelserve.engine.runner import ModelRunner
from modelserve.engine.sampler import RowLogprobs, SamplingRow, sample
from modelserve.engine.scheduler import Scheduler
from modelserve.engine.sequence import Sequence
from modelserve.engine.stop import StopSequenceMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Submit:
    seq: Sequence


@dataclass(frozen=True)
class _Abort:
    key: int
    reason: FinishReason
    error: str = ""


@dataclass(frozen=True)
class _AbortAll:
    reason: FinishReason
    error: str


@dataclass(frozen=True)
class _Stop:
    pass


_Command = _Submit | _Abort | _AbortAll | _Stop


class RequestStream:
    """The async stream of one request's events; `abort()` ends it early."""

    def __init__(self, engine: Engine, key: int, events: asyncio.Queue[StreamEvent]) -> None:
        self._engine = engine
        self._key = key
        self._events = events
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        if event.finish is not None:
            self._done = True
        return event

    def abort(self, reason: FinishReason = FinishReason.CANCELLED, error: str = "") -> None:
        """Stop generating for this request at the next step (no-op once finished)."""
        if not self._done:
            self._done = True
            self._engine._send(_Abort(self._key, reason, error))


@dataclass(frozen=True)
class EngineConfig:
    """The engine's share of the server's Config (its defaults are Config's, written once there)."""

    max_batch_size: int = Config.max_batch_size
    prefill_chunk_tokens: int = Config.prefill_chunk_tokens  # 0 = AUTO_PREFILL_CHUNK_CPU / _CUDA
    kv_cache_bytes: int = Config.kv_cache_bytes  # 0 = a share of free GPU memory, DEFAULT_CPU_KV_BYTES on CPU
    gpu_memory_fraction: float = Config.gpu_memory_fraction
    max_waiting_requests: int = Config.max_waiting_requests  # more are refused (QueueFullError)
    max_waiting_tokens: int = Config.max_waiting_tokens  # 0 = AUTO_WAITING_KV_BUDGETS x the KV budget

    @classmethod
    def from_config(cls, config: Config) -> EngineConfig:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


MIN_PREFILL_CHUNK_AFTER_OOM = 16


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError)


class Engine:
    """Continuous batching over one model: submit, stream events, abort."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        eos_token_ids: Iterable[int],
        config: EngineConfig,
        max_sequence_length: int,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self._runner = ModelRunner(model)
        self._tokenizer = tokenizer
        self._eos_ids = frozenset(eos_token_ids)
        shape = self._runner.kv_shape
        budget_tokens = self._kv_budget_bytes(config) // shape.bytes_per_token
        self._pool = KVPool(shape, budget_tokens, config.max_batch_size, max_sequence_length)
        self.max_sequence_tokens = self._pool.max_columns
        """The longest sequence (prompt + max_new_tokens) that can ever run: context and KV budget."""
        chunk = config.prefill_chunk_tokens or (
            AUTO_PREFILL_CHUNK_CUDA if self._runner.device.type == "cuda" else AUTO_PREFILL_CHUNK_CPU
        )
        self._scheduler = Scheduler(config.max_batch_size, chunk)
        self._admission = AdmissionControl(
            QueueLimits(
                config.max_waiting_requests, config.max_waiting_tokens or AUTO_WAITING_KV_BUDGETS * budget_tokens
            )
        )
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._keys = itertools.count(1)
        self._live: dict[int, Sequence] = {}  # engine thread only
        self._queues: dict[int, asyncio.Queue[StreamEvent]] = {}  # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopped: asyncio.Event | None = None
        self._stats = EngineStats(kv_budget_tokens=budget_tokens, max_batch_size=config.max_batch_size)
        self._on_step = on_step
        log.info(
            "KV pool: budget %d tokens (%.2f GiB at %d bytes/token), up to %d rows",
            budget_tokens,
            budget_tokens * shape.bytes_per_token / 2**30,
            shape.bytes_per_token,
            config.max_batch_size,
        )

    def _kv_budget_bytes(self, config: EngineConfig) -> int:
        if config.kv_cache_bytes:
            return config.kv_cache_bytes
        device = self._runner.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * config.gpu_memory_fraction)
        return DEFAULT_CPU_KV_BYTES

    # ---- the asyncio side -------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopped = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="modelserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    async def wait_stopped(self) -> None:
        """Return once the engine loop has ended, by shutdown() or by dying."""
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; iterate the returned stream for its events.

        Raises EngineClosedError, QueueFullError (the waiting queue is at its limit) or
        DeadlineUnreachableError (the queue ahead makes request.deadline_s impossible).
        """
        if not self.alive:
            raise EngineClosedError("the engine is not running")
        now = time.monotonic()
        self._admission.enter(request, now)
        key = next(self._keys)
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._queues[key] = events
        seq = Sequence(
            key=key,
            request=request,
            arrival_s=now,
            detokenizer=IncrementalDetokenizer(self._tokenizer, request.prompt_ids),
            stops=StopSequenceMatcher(request.params.stop, request.params.include_stop_sequence),
            generator=torch.Generator().manual_seed(request.params.seed),
        )
        self._send(_Submit(seq))
        return RequestStream(self, key, events)

    def stats(self) -> EngineStats:
        return self._stats

    def check_queue(self) -> None:
        """Raise QueueFullError when the waiting queue has no room for any request."""
        self._admission.check()

    def abort_all(self, reason: FinishReason, error: str) -> None:
        """End every request at the next step, each with a last event saying `error`."""
        self._send(_AbortAll(reason, error))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; requests still in it end with CANCELLED."""
        if self._thread is None:
            return
        self._send(_Stop())
        self._thread.join(timeout_s)

    def _send(self, command: _Command) -> None:
        self._inbox.put(command)

    def _deliver(self, batch: list[tuple[int, StreamEvent]]) -> None:
        for key, event in batch:
            events = self._queues.get(key)
            if events is None:
                continue
            events.put_nowait(event)
            if event.finish is not None:
                del self._queues[key]

    # ---- the engine thread ------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands(block=not self._scheduler.has_work()):
                self._step()
        except BaseException:
            log.exception("engine loop died")
            raise
        finally:
            self._closed = True
            self._finish_all(FinishReason.CANCELLED, "the engine stopped")
            loop, stopped = self._loop, self._stopped
            if loop is not None and stopped is not None and not loop.is_closed():
                loop.call_soon_threadsafe(stopped.set)

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands; False once told to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Submit):
                self._live[command.seq.key] = command.seq
                self._scheduler.add(command.seq)
            elif isinstance(command, _AbortAll):
                for live in self._live.values():
                    if live.finish is None and live.abort_reason is None:
                        live.abort_reason, live.abort_error = command.reason, command.error
            else:
                target = self._live.get(command.key)
                if target is not None and target.finish is None and target.abort_reason is None:
                    target.abort_reason, target.abort_error = command.reason, command.error

    def _step(self) -> None:
        out: list[tuple[int, StreamEvent]] = []
        scheduler = self._scheduler
        step_started = time.perf_counter()
        scheduler.expire(time.monotonic())
        were_waiting, were_prefilling = scheduler.take_aborted()
        for seq in were_waiting:  # dropped without touching the model
            self._admission.leave(seq.request)
        for seq in (*were_waiting, *were_prefilling):
            seq.prefill = None
            out.append(self._finish(seq, seq.abort_reason or FinishReason.CANCELLED, seq.abort_error))
        for seq in scheduler.running:
            if seq.abort_reason is not None and seq.finish is None:
                out.append(self._finish(seq, seq.abort_reason, seq.abort_error))
        self._free_finished_rows()

        for seq in scheduler.admit(self._pool.fits):
            self._admission.leave(seq.request)
            seq.scheduled_s = time.monotonic()
            seq.prefill = PrefillBuffer(self._runner.kv_shape, len(seq.request.prompt_ids))
        prefill_started, prefilled = time.perf_counter(), 0
        for seq, n_tokens in scheduler.prefill_plan():
            prefilled += n_tokens
            try:
                event = self._prefill(seq, n_tokens)
            except Exception as exc:  # this prompt failed; the running rows are untouched
                scheduler.prefilling.remove(seq)
                seq.prefill = None
                event = self._finish(seq, *self._step_failed("prefill", exc, n_tokens))
            if event is not None:
                out.append(event)
        if prefilled and self._on_step is not None:
            self._runner.synchronize()  # so the prefill's time is its own
        prefill_s = time.perf_counter() - prefill_started

        running = scheduler.running
        decode_started, batch_size = time.perf_counter(), len(running)
        if running:
            try:
                logits = self._runner.decode(self._pool, [s.output_ids[-1] for s in running])
                result = sample(logits, [self._sampling_row(s) for s in running])  # waits for the device
                for seq, token, lp, chosen in zip(
                    running, result.token_ids, result.logprobs, result.chosen_logprobs, strict=True
                ):
                    out.append(self._append(seq, token, chosen, lp))
            except Exception as exc:  # a failed step fails the requests it touched, not the engine
                out.extend(self._fail_running(*self._step_failed("decode", exc, batch_size)))
        decode_s = time.perf_counter() - decode_started if running else 0.0
        self._free_finished_rows()
        self._admission.observe_step(prefilled, prefill_s, batch_size, time.perf_counter() - step_started)
        if self._on_step is not None and (prefilled or batch_size):
            try:
                self._on_step(StepRecord(batch_size, prefilled, prefill_s if prefilled else 0.0, decode_s))
            except Exception:  # an observer's failure is not the engine's
                log.exception("step observer failed")

        self._forget_finished(out)
        self._stats = self._snapshot()
        if out and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, out)

    def _snapshot(self) -> EngineStats:
        scheduler = self._scheduler
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(scheduler.prefilling),
            kv_budget_tokens=self._pool.budget_tokens,
            kv_tokens_used=self._pool.tokens_held(),
            waiting_tokens=self._admission.waiting()[1],
            max_batch_size=scheduler.max_batch_size,
        )

    def _step_failed(self, phase: str, exc: Exception, size: int) -> tuple[FinishReason, str]:
        """Log a failed step and say how its requests end. Out of memory lowers the load that caused it:
        the batch size after a decode step, the prefill chunk after a prefill, so it does not repeat."""
        what = f"{type(exc).__name__}: {exc}"
        if not _is_out_of_memory(exc):
            log.exception("%s step failed; its requests end with an error", phase)
            return FinishReason.ERROR, what
        scheduler = self._scheduler
        if phase == "decode":
            scheduler.max_batch_size = max(1, min(scheduler.max_batch_size, size) // 2)
            lowered = f"the batch size is now at most {scheduler.max_batch_size}"
        else:
            chunk = max(MIN_PREFILL_CHUNK_AFTER_OOM, min(scheduler.prefill_chunk_tokens, size) // 2)
            scheduler.prefill_chunk_tokens = chunk
            lowered = f"the prefill chunk is now {chunk} tokens"
        if self._runner.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory in a %s step of %d; %s (%s)", phase, size, lowered, what)
        return FinishReason.OUT_OF_MEMORY, f"out of memory in a {phase} step ({what}); {lowered}"

    def _prefill(self, seq: Sequence, n_tokens: int) -> tuple[int, StreamEvent] | None:
        """Prefill the next chunk; when the prompt is done, sample the first token and join the batch."""
        buffer = seq.prefill
        assert buffer is not None
        prompt = seq.request.prompt_ids
        logits = self._runner.prefill_chunk(buffer, list(prompt[buffer.past : buffer.past + n_tokens]))
        if buffer.past < len(prompt):
            return None
        self._scheduler.prefilling.remove(seq)
        result = sample(logits[None, :], [self._sampling_row(seq)])
        event = self._append(seq, result.token_ids[0], result.chosen_logprobs[0], result.logprobs[0])
        if seq.finish is None:
            self._pool.add(buffer, seq.need)
            self._scheduler.running.append(seq)
        seq.prefill = None
        return event

    def _free_finished_rows(self) -> None:
        for row in self._scheduler.finished_rows():
            self._pool.remove(row)
            self._scheduler.remove_row(row)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        suppress: frozenset[int] = frozenset()
        if len(seq.output_ids) < params.min_new_tokens:
            suppress = params.stop_token_ids | (frozenset() if params.ignore_eos else self._eos_ids)
        seen = seq.seen_ids if params.repetition_penalty != 1.0 else ()
        return SamplingRow(params, seq.generator, seen, suppress)

    def _append(self, seq: Sequence, token: int, logprob: float, lp: RowLogprobs | None) -> tuple[int, StreamEvent]:
        """Add one sampled token (and its raw log-probability) to a sequence; decide whether it ends it."""
        now = time.monotonic()
        seq.output_ids.append(token)
        seq.logprob_sum += logprob
        if seq.first_token_s is None:
            seq.first_token_s = now
        params = seq.params
        reason: FinishReason | None = None
        if token in params.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif token in self._eos_ids and not params.ignore_eos:
            reason = FinishReason.EOS_TOKEN
        last = reason is not None or len(seq.output_ids) >= params.max_new_tokens
        # An ending token adds no text of its own; the last token releases what the detokenizer holds.
        piece = "" if reason is not None else seq.detokenizer.step(token)
        match = seq.stops.push(piece + seq.detokenizer.flush() if last else piece)
        text = match.text
        if match.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif last:
            reason = reason or FinishReason.LENGTH
            text += seq.stops.flush()
        logprobs = (self._token_logprobs(token, lp),) if lp is not None else ()
        finish = self._close(seq, reason) if reason is not None else None
        return seq.key, StreamEvent(text, (token,), len(seq.output_ids), logprobs, finish)

    def _close(self, seq: Sequence, reason: FinishReason, error: str = "") -> Finish:
        """Mark a sequence finished and say how it went."""
        now = time.monotonic()
        seq.finish = reason
        start = seq.arrival_s
        timings = Timings(
            queue_s=(seq.scheduled_s or now) - start,
            time_to_first_token_s=(seq.first_token_s or now) - start,
            total_s=now - start,
        )
        mean_logprob = seq.logprob_sum / len(seq.output_ids) if seq.output_ids else None
        return Finish(reason, timings, seq.params.seed, error, mean_logprob)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str = "") -> tuple[int, StreamEvent]:
        """Close a sequence that produced no token this step: its last, empty event."""
        finish = self._close(seq, reason, error)
        return seq.key, StreamEvent("", (), len(seq.output_ids), (), finish)

    def _token_logprobs(self, token: int, lp: RowLogprobs) -> TokenLogprobs:
        decode = self._tokenizer.decode
        top = tuple(
            TokenLogprob(t, decode([t], skip_special_tokens=False), v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        )
        return TokenLogprobs(TokenLogprob(token, decode([token], skip_special_tokens=False), lp.chosen), top)

    def _fail_running(self, reason: FinishReason, error: str) -> list[tuple[int, StreamEvent]]:
        """After a failed decode step every running row is suspect: end them all and free their rows."""
        out = [self._finish(s, reason, error) for s in self._scheduler.running if s.finish is None]
        self._scheduler.running = []
        self._pool.clear()
        return out

    def _forget_finished(self, out: list[tuple[int, StreamEvent]]) -> None:
        for key, event in out:
            if event.finish is not None:
                self._live.pop(key, None)

    def _finish_all(self, reason: FinishReason, error: str) -> None:
        """The loop is ending: close every request it holds or has yet to take from its inbox."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                self._live[command.seq.key] = command.seq
                self._scheduler.add(command.seq)
        for seq in self._scheduler.waiting:
            self._admission.leave(seq.request)
        out = [self._finish(s, reason, error) for s in self._live.values() if s.finish is None]
        self._live.clear()
        self._scheduler.running, self._scheduler.prefilling, self._scheduler.waiting = [], [], []
        self._pool.clear()
        self._stats = self._snapshot()
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)
