"""The engine as the servicer sees it: submit, stream, abort, stats; token ids in, text out.

The frontend half of the engine runs on the server's event loop: admission
control (so a refusal costs no trip to the core), and for each StepOutput the
core sends, every row's incremental detokenization, stop-sequence matching and
log-probability token strings. A stop sequence found here aborts its row in the
core at once; the core waits for each step's acknowledgement before running two
steps past it, so it runs at most one step past a stop (and never far ahead of
a frontend that lags). A consumer that reads slower than the core steps gets
its deltas merged into one event: nothing queues per token.

Two engines share this: `Engine` (engine.py) runs the core on a thread of this
process; `ProcessEngine` (client.py) runs it in a process of its own.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable

from tokenizers import Tokenizer

from modelserve.engine.admission import AdmissionControl, QueueLimits
from modelserve.engine.detokenizer import IncrementalDetokenizer
from modelserve.engine.protocol import (
    Abort,
    AbortAll,
    Ack,
    AddLora,
    AddRequest,
    Command,
    FlushCache,
    KvEvent,
    RemoveLora,
    RowOutput,
    StartProfile,
    StepOutput,
    StopProfile,
)
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
from modelserve.engine.stop import StopSequenceMatcher
from modelserve.models.lora import LoraAdapter

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0  # the window EngineStats.generated_tokens_per_s is measured over
KV_EVENT_BATCHES = 4096  # batches of prefix-cache events kept for a subscriber that resumes from a number
KV_SUBSCRIBER_BATCHES = 1024  # batches a subscriber may fall behind before it is dropped


@dataclasses.dataclass(frozen=True)
class KvEventBatch:
    """One step's prefix-cache events, numbered from 1 in the order the core made them."""

    sequence_number: int
    timestamp_s: float  # wall clock
    events: list[KvEvent]


class KvSubscriberLagged(RuntimeError):
    """A subscriber read its events more slowly than the engine made them and was dropped."""


@dataclasses.dataclass(eq=False)  # kept in a set, by identity
class _KvSubscriber:
    queue: asyncio.Queue[KvEventBatch] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(maxsize=KV_SUBSCRIBER_BATCHES)
    )
    lagged: bool = False


_NO_TEXT_ENDINGS = (FinishReason.STOP_TOKEN, FinishReason.EOS_TOKEN)  # an ending token adds no text


class _RequestState:
    """One request's progress on the frontend side, and what its consumer has not read yet."""

    def __init__(self, key: int, request: Request, tokenizer: Tokenizer, arrival_s: float) -> None:
        self.key = key
        self.request = request
        self.arrival_s = arrival_s
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stops = StopSequenceMatcher(request.params.stop, request.params.include_stop_sequence)
        self.admitted_s: float | None = None
        self.first_token_s: float | None = None
        self.output_tokens = 0
        self.cached_tokens = 0
        self.logprob_sum = 0.0
        self.logprob_count = 0
        self.finish: Finish | None = None
        self.stop_sequence = ""  # the one that ended it, once one has
        self.delivered_finish = False
        self.aborted = False  # its consumer stopped reading
        # Not yet read by the consumer (merged when it lags):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: tuple[TokenLogprobs, ...] = ()
        self.ready = asyncio.Event()

    def take(self) -> StreamEvent:
        event = StreamEvent(
            "".join(self.text),
            tuple(self.token_ids),
            self.output_tokens,
            tuple(self.logprobs),
            self.finish,
            self.cached_tokens,
            self.prompt_logprobs,
        )
        self.text, self.token_ids, self.logprobs, self.prompt_logprobs = [], [], [], ()
        self.delivered_finish = self.finish is not None
        self.ready.clear()
        return event

    @property
    def has_news(self) -> bool:
        return bool(self.text or self.token_ids) or (self.finish is not None and not self.delivered_finish)


class RequestStream:
    """The async stream of one request's events; `abort()` ends it early."""

    def __init__(self, engine: EngineFrontend, state: _RequestState) -> None:
        self._engine = engine
        self._state = state

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        state = self._state
        while not state.has_news:
            if state.delivered_finish:
                raise StopAsyncIteration
            await state.ready.wait()
        return state.take()

    def abort(self, reason: FinishReason = FinishReason.CANCELLED, error: str = "") -> None:
        """Stop generating for this request at the next step (no-op once finished)."""
        self._engine._abort(self._state, reason, error)


class EngineFrontend(abc.ABC):
    """Admission, streams and text for an engine core that runs elsewhere (a thread or a process)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: QueueLimits,
        max_sequence_tokens: int,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.max_sequence_tokens = max_sequence_tokens
        """The longest sequence (prompt + max_new_tokens) that can ever run: context and KV budget."""
        self._admission = AdmissionControl(limits)
        self._on_step = on_step
        self._keys = itertools.count(1)
        self._states: dict[int, _RequestState] = {}
        self._stats = EngineStats()
        self._throughput: collections.deque[tuple[float, int]] = collections.deque([(time.monotonic(), 0)])
        self._throughput_lock = threading.Lock()  # stats() is also read on the metrics exporter's thread
        self._kv_log: collections.deque[KvEventBatch] = collections.deque(maxlen=KV_EVENT_BATCHES)
        self._kv_subscribers: set[_KvSubscriber] = set()
        self._closed = False
        self._stopped = asyncio.Event()

    # ---- what the servicer calls ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._closed

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; iterate the returned stream for its events.

        Raises EngineClosedError, QueueFullError (the waiting queue is at its limit) or
        DeadlineUnreachableError (the queue ahead makes request.deadline_s impossible).
        """
        if self._closed:
            raise EngineClosedError("the engine is not running")
        now = time.monotonic()
        self._admission.enter(request, now)
        state = _RequestState(next(self._keys), request, self._tokenizer, now)
        self._states[state.key] = state
        self._send(AddRequest(state.key, request))
        return RequestStream(self, state)

    @property
    def queue_limits(self) -> QueueLimits:
        return self._admission.limits

    def check_queue(self) -> None:
        """Raise QueueFullError when the waiting queue has no room for any request."""
        self._admission.check()

    def stats(self) -> EngineStats:
        return dataclasses.replace(
            self._stats, waiting_tokens=self._admission.waiting()[1], generated_tokens_per_s=self._tokens_per_s()
        )

    def _tokens_per_s(self) -> float:
        """Output tokens a second over the last THROUGHPUT_WINDOW_S (0 when idle that long)."""
        now = time.monotonic()
        with self._throughput_lock:
            recent = [(t, n) for t, n in self._throughput if now - t <= THROUGHPUT_WINDOW_S]
        return sum(n for _, n in recent) / THROUGHPUT_WINDOW_S if recent else 0.0

    def _publish(self, events: list[KvEvent]) -> None:
        """Number a step's prefix-cache events, keep them for resuming subscribers, hand them to the live ones
        (never waiting: one that has fallen KV_SUBSCRIBER_BATCHES behind is dropped)."""
        batch = KvEventBatch(self._kv_log[-1].sequence_number + 1 if self._kv_log else 1, time.time(), events)
        self._kv_log.append(batch)
        for subscriber in list(self._kv_subscribers):
            try:
                subscriber.queue.put_nowait(batch)
            except asyncio.QueueFull:
                subscriber.lagged = True
                self._kv_subscribers.discard(subscriber)

    async def kv_events(self, start: int = 0) -> AsyncGenerator[KvEventBatch, None]:
        """The prefix cache's changes as they come; with `start`, the kept batches numbered from it first.
        KvSubscriberLagged once the reader has fallen too far behind."""
        subscriber = _KvSubscriber()
        self._kv_subscribers.add(subscriber)  # before the backlog is read: nothing made between is missed
        backlog = [batch for batch in self._kv_log if batch.sequence_number >= start] if start else []
        try:
            for batch in backlog:
                yield batch
            while True:
                if subscriber.lagged and subscriber.queue.empty():
                    raise KvSubscriberLagged(f"fell more than {KV_SUBSCRIBER_BATCHES} batches of KV events behind")
                yield await subscriber.queue.get()
        finally:
            self._kv_subscribers.discard(subscriber)

    def flush_cache(self) -> None:
        """Drop the prefix cache's blocks that no running request holds, at the core's next step."""
        self._send(FlushCache())

    def add_lora(self, adapter: LoraAdapter) -> None:
        """Make a checked adapter (models/lora.py) available to requests by its name, from the next command on."""
        self._send(AddLora(adapter.name, adapter.path, adapter.rank, adapter.scaling, list(adapter.modules)))

    def remove_lora(self, name: str) -> None:
        """Unload an adapter: requests waiting for it end; running ones finish with it."""
        self._send(RemoveLora(name))

    def start_profile(self, profile: StartProfile) -> None:
        """Profile the core's steps into `profile.path` (step_profiler.py)."""
        self._send(profile)

    def stop_profile(self) -> None:
        """End the profile; the core writes its trace as it takes the command."""
        self._send(StopProfile())

    def abort_all(self, reason: FinishReason, error: str) -> None:
        """End every request at the next step, each with a last event saying `error`."""
        self._send(AbortAll(reason, error))

    async def wait_stopped(self) -> None:
        """Return once the engine core has ended, by shutdown() or by dying."""
        await self._stopped.wait()

    @abc.abstractmethod
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core; requests still in it end with CANCELLED."""

    # ---- the core's side --------------------------------------------------------------------------------

    @abc.abstractmethod
    def _send(self, command: Command) -> None:
        """Hand a command to the core (never blocks)."""

    def _on_output(self, out: StepOutput) -> None:
        """Take in one step's output (on the event loop), then acknowledge it."""
        now = time.monotonic()
        for key in out.admitted:
            state = self._states.get(key)
            if state is not None and state.admitted_s is None:
                state.admitted_s = now
                self._admission.leave(state.request)
        for row in out.rows:
            state = self._states.get(row.key)
            if state is not None:
                self._take_row(state, row, now)
        if out.kv_events:
            self._publish(out.kv_events)
        with self._throughput_lock:
            self._throughput.append((now, sum(1 for row in out.rows if row.token_id >= 0)))
            while now - self._throughput[0][0] > THROUGHPUT_WINDOW_S:
                self._throughput.popleft()
        self._stats = out.stats
        record = out.record
        if record is not None:
            self._admission.observe_step(record.prefill_tokens, record.prefill_s, record.batch_size, record.step_s)
            if self._on_step is not None:
                try:
                    self._on_step(record)
                except Exception:  # an observer's failure is not the engine's
                    log.exception("step observer failed")
        self._send(Ack(out.step))

    def _take_row(self, state: _RequestState, row: RowOutput, now: float) -> None:
        reason, error = row.finish, row.error
        if row.token_id >= 0:
            token = row.token_id
            state.output_tokens += 1
            if state.output_tokens == 1:  # the core says these with the first token
                state.cached_tokens = row.cached_tokens
                if row.prompt_logprobs is not None:
                    state.prompt_logprobs = self._prompt_logprobs(state.request.prompt_ids, row)
            state.token_ids.append(token)
            if state.first_token_s is None:
                state.first_token_s = now
            if row.logprob is not None:
                state.logprob_sum += row.logprob
                state.logprob_count += 1
            if state.request.params.logprobs:
                state.logprobs.append(self._token_logprobs(token, row))
            last = reason is not None
            piece = "" if reason in _NO_TEXT_ENDINGS else state.detokenizer.step(token)
            match = state.stops.push(piece + state.detokenizer.flush() if last else piece)
            state.text.append(match.text)
            if match.stopped:
                state.stop_sequence = match.stop
                if reason is None:  # the core goes on with this row until the abort reaches it
                    self._send(Abort(state.key, FinishReason.STOP_SEQUENCE))
                reason = FinishReason.STOP_SEQUENCE
            elif last:
                state.text.append(state.stops.flush())
        if reason is not None:
            self._finish(state, reason, error, now)
        state.ready.set()

    def _token_logprobs(self, token: int, row: RowOutput) -> TokenLogprobs:
        decode = self._tokenizer.decode
        top = tuple(
            TokenLogprob(t, decode([t], skip_special_tokens=False), v)
            for t, v in zip(row.top_ids or (), row.top_logprobs or (), strict=True)
        )
        chosen = row.logprob if row.logprob is not None else float("nan")
        return TokenLogprobs(TokenLogprob(token, decode([token], skip_special_tokens=False), chosen), top)

    def _prompt_logprobs(self, prompt_ids: tuple[int, ...], row: RowOutput) -> tuple[TokenLogprobs, ...]:
        """Prompt tokens 1.. with their log-probabilities, ranks and alternatives, as text."""

        def text(token: int) -> str:
            return self._tokenizer.decode([token], skip_special_tokens=False)

        assert row.prompt_logprobs is not None
        n = len(row.prompt_logprobs)
        ranks = row.prompt_ranks or [0] * n
        top_ids, top_values = row.prompt_top_ids or [[]] * n, row.prompt_top_logprobs or [[]] * n
        out = []
        for token, logprob, rank, ids, values in zip(
            prompt_ids[1:], row.prompt_logprobs, ranks, top_ids, top_values, strict=True
        ):
            top = tuple(TokenLogprob(t, text(t), v, r + 1) for r, (t, v) in enumerate(zip(ids, values, strict=True)))
            out.append(TokenLogprobs(TokenLogprob(token, text(token), logprob, rank), top))
        return tuple(out)

    def _finish(self, state: _RequestState, reason: FinishReason, error: str, now: float) -> None:
        """The request's one ending: timings from the frontend's own clock, and it stops taking rows."""
        del self._states[state.key]
        if state.admitted_s is None:  # it never left the waiting queue
            self._admission.leave(state.request)
        timings = Timings(
            queue_s=(state.admitted_s or now) - state.arrival_s,
            time_to_first_token_s=(state.first_token_s or now) - state.arrival_s,
            total_s=now - state.arrival_s,
        )
        mean = state.logprob_sum / state.logprob_count if state.logprob_count else None
        state.finish = Finish(reason, timings, state.request.params.seed, error, mean, state.stop_sequence)
        state.ready.set()

    def _abort(self, state: _RequestState, reason: FinishReason, error: str) -> None:
        if state.finish is None and not state.aborted and not self._closed:
            state.aborted = True
            self._send(Abort(state.key, reason, error))

    def _core_stopped(self, error: str) -> None:
        """The core is gone (shut down or dead): every request still open ends now, saying `error`."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        for state in list(self._states.values()):
            self._finish(state, FinishReason.CANCELLED, error, now)
        self._stats = dataclasses.replace(self._stats, running=0, waiting=0, prefilling=0, kv_tokens_used=0)
        self._stopped.set()
