"""What every face of the server shares: its phase, the served model and engine, the limits, the calls in
flight (what a drain waits for), and one request's way from prompt text to an engine stream, with each
refusal counted and each outcome tracked.

The gRPC servicers (grpc/) and the OpenAI-compatible HTTP app (openai/) all serve through one
Serving, so a limit, a priority rule or a metric is written once, and a drain waits for the calls of
both. A refusal is a RequestFailed carrying a gRPC status code: the server's one vocabulary of outcomes,
which the HTTP app maps onto HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from modelserve_client.v1 import generation_pb2 as pb

from modelserve.config import Config
from modelserve.engine.request import (
    DeadlineUnreachableError,
    EngineClosedError,
    FinishReason,
    QueueFullError,
    Request,
    StreamEvent,
)
from modelserve.server.core.adapters import Adapters
from modelserve.server.core.chat import ChatError, ChatMessage, check_chat_size, render_chat
from modelserve.server.core.params import Parameters
from modelserve.server.core.validation import (
    InvalidArgument,
    Limits,
    build_request,
    check_priority,
    check_prompt_size,
    check_token_ids,
    resolve_defaults,
    truncate_prompt,
)
from modelserve.telemetry.call_status import ended_early_code
from modelserve.telemetry.metrics import CHAT_OPERATION, OPERATION, GenerationMetrics
from modelserve.telemetry.request_outcome import OutcomeTracker

if TYPE_CHECKING:
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.models.loader import ModelInfo as ServedModel
    from modelserve.server.core.tools import Tool


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's retry hint (gRFC A6), read by clients' retry policies
# A prompt up to this many characters is tokenized on the event loop (well under a millisecond); a longer one
# on a worker thread, so a long prompt (up to --max-prompt-bytes) does not stall every open stream meanwhile.
ON_LOOP_PROMPT_CHARS = 4096
_T = TypeVar("_T")


class Phase(enum.Enum):
    LOADING = pb.SERVER_STATE_LOADING
    SERVING = pb.SERVER_STATE_SERVING
    DRAINING = pb.SERVER_STATE_DRAINING
    FAILED = pb.SERVER_STATE_FAILED


_NOT_SERVING_WHY = {
    Phase.LOADING: "the model is still loading",
    Phase.DRAINING: "the server is shutting down",
    Phase.FAILED: "the engine has failed; the server must be restarted",
}


@dataclasses.dataclass(frozen=True)
class Health:
    """The server's health as every face reports it: `phase` is FAILED once the engine is gone, even before
    the lifecycle has noticed; `why` is what a caller is told."""

    phase: Phase
    up: bool
    why: str


class RequestFailed(Exception):
    """A request the server refused or could not finish; str(exc) is what the caller is told."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # set when the queue was full: when a place should free up


@dataclasses.dataclass(frozen=True)
class Choice:
    """One choice of a call that asks for several: its prompt (or its token ids) and parameters."""

    prompt: str
    params: Parameters
    request_id: str = ""
    prompt_ids: Sequence[int] | None = None


def sample_choices(
    prompt: str,
    params: Parameters,
    samples: int,
    request_id: str = "",
    prompt_ids: Sequence[int] | None = None,
    seed_modulus: int = 2**64,
) -> list[Choice]:
    """`samples` choices of one prompt. With the caller's seed, sample j draws from seed + j (mod
    `seed_modulus`, the face's seed range), so each is what a lone request with that seed gives; without one,
    each gets a seed of its own. Sample j > 0 of a named request is REQUEST_ID-j."""
    choices = []
    for sample in range(samples):
        own = params
        if sample and params.seed is not None:
            own = dataclasses.replace(params, seed=(params.seed + sample) % seed_modulus)
        own_id = f"{request_id}-{sample}" if sample and request_id else request_id
        choices.append(Choice(prompt, own, own_id, prompt_ids))
    return choices


class Serving:
    """One model served through one engine, once `attach` has been called; `phase` says whether it takes calls."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_s = time.monotonic()
        self._refused = asyncio.Event()  # set by each call refused UNAVAILABLE (loading, draining)
        self.phase = Phase.LOADING
        self.model: ServedModel | None = None
        self.engine: Engine | None = None
        self._limits: Limits | None = None
        self._metrics: GenerationMetrics | None = None
        self._in_flight = 0  # generation calls past admission, not yet ended, over every face
        self._idle = asyncio.Event()
        self._idle.set()
        self.adapters = Adapters(config)

    def attach(self, model: ServedModel, engine: Engine, metrics: GenerationMetrics | None = None) -> None:
        self.model, self.engine, self._metrics = model, engine, metrics
        self.adapters.attach(engine, model)
        cfg = self.config
        longest_prompt = engine.max_sequence_tokens - 1  # leaves room for one new token
        max_max_new_tokens = min(cfg.max_max_new_tokens, longest_prompt)
        self._limits = Limits(
            vocab_size=model.vocab_size,
            max_sequence_length=engine.max_sequence_tokens,
            defaults=resolve_defaults(
                model.generation_defaults, cfg.default_max_new_tokens, max_max_new_tokens, model.vocab_size
            ),
            max_max_new_tokens=max_max_new_tokens,
            max_prompt_bytes=cfg.max_prompt_bytes,
            max_stop_sequences=cfg.max_stop_sequences,
            max_stop_sequence_chars=cfg.max_stop_sequence_chars,
            max_top_logprobs=cfg.max_top_logprobs,
            max_prompt_tokens=min(cfg.max_prompt_tokens or longest_prompt, longest_prompt),
        )

    def health(self) -> Health:
        """Whether new calls are served, and why not: the one answer behind HTTP /health, vLLM's HealthCheck,
        the Health RPC and every face's refusal. (grpc.health.v1 is set by the lifecycle, app.py, at each
        change of phase, and so follows an engine's death a moment later.)"""
        if self.phase is Phase.SERVING and not (self.engine is not None and self.engine.alive):
            return Health(Phase.FAILED, False, _NOT_SERVING_WHY[Phase.FAILED])  # before the phase catches up
        if self.phase is Phase.SERVING:
            return Health(Phase.SERVING, True, "serving")
        return Health(self.phase, False, _NOT_SERVING_WHY[self.phase])

    def ready(self, health_hint: str, chat: bool = False) -> tuple[Engine, ServedModel, Limits]:
        """The engine, model and limits while serving; else RequestFailed UNAVAILABLE, counted as a refusal
        (of a chat's request when `chat`).

        `health_hint` names the check a caller should wait on while the model loads (each face has its own).
        """
        health = self.health()
        if health.up:
            assert self.engine is not None and self.model is not None and self._limits is not None
            return self.engine, self.model, self._limits
        advice = {Phase.LOADING: f"; retry when {health_hint}", Phase.DRAINING: "; retry on another replica"}
        self._refused.set()
        self.rejected("unavailable", chat)
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, health.why + advice.get(health.phase, ""))

    async def prepare(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        choice: Choice,
        *,
        priority: int = 0,
        deadline_s: float | None = None,
        field: str = "",
        chat: bool = False,
        lora: str = "",
        encoded: dict[str, list[int]],
    ) -> Request:
        """The engine request for `choice`, validated, not yet submitted; a refusal is counted and raised as
        RequestFailed. `deadline_s` is on time.monotonic(); `encoded` holds prompts already tokenized by this
        call (its samples share one prompt), and takes this one's.

        `field` prefixes the caller's field names in messages (a batch item's place in its batch); `lora` is
        the adapter the request runs with (Adapters.resolve), "" for the base model.
        `chat`: the prompt is a chat rendered by its template, which wrote the special tokens (chat.py), so
        the tokenizer adds none; a refusal counts as a chat's.
        A choice's `prompt_ids` is a prompt that comes tokenized (the vLLM face's): checked against the
        vocabulary instead of encoded, and its `prompt` is then only the text telemetry may show.
        """
        prompt, params, request_id, prompt_ids = choice.prompt, choice.params, choice.request_id, choice.prompt_ids
        prefix = f"{field}." if field else ""
        try:
            engine.check_queue()  # before tokenizing: a refusal under overload must cost next to nothing
        except QueueFullError as exc:
            raise self._queue_full(exc, prefix, chat) from None
        try:
            check_priority(priority)
            if prompt_ids is None:
                check_prompt_size(prompt, limits)
                ids = encoded.get(prompt)
                if ids is None:
                    ids = encoded[prompt] = await encode_prompt(model, prompt, not chat)
            else:
                ids = check_token_ids(prompt_ids, limits)
            engine_request = build_request(
                request_id or uuid.uuid4().hex, truncate_prompt(ids, params, limits), params, limits
            )
        except InvalidArgument as exc:
            self.rejected("invalid_argument", chat)
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc)) from None
        return dataclasses.replace(engine_request, priority=priority, deadline_s=deadline_s, lora=lora)

    def max_choices(self, engine: Engine) -> int:
        """The most choices (prompts x samples) one call may ask for: each waits in the queue as a request."""
        return min(self.config.max_batch_requests, engine.queue_limits.max_requests)

    async def start_choices(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        choices: Sequence[Choice],
        *,
        priority: int = 0,
        time_remaining_s: float | None = None,
        field: str = "",
        chat: bool = False,
        where: Callable[[int], str] | None = None,
        lora: str = "",
    ) -> list[tuple[Request, RequestStream]]:
        """A call's choice or choices (a list of prompts, n samples): every one validated before any is
        submitted, and their prompt tokens checked against the waiting queue's bound, so one refused means
        none runs; a submit that fails takes back the ones before it. Submitted together, samples of one
        prompt compute it once (the scheduler waits for the blocks one of them is computing). `where(i)`
        names choice i in a refusal's message."""

        def refusal(exc: RequestFailed, index: int) -> RequestFailed:
            return exc if where is None else RequestFailed(exc.code, f"{exc} ({where(index)})", exc.retry_after_s)

        # read before any prompt is tokenized: the time that takes counts against the caller's deadline
        deadline_s = time.monotonic() + time_remaining_s if time_remaining_s is not None else None
        encoded: dict[str, list[int]] = {}
        prepared = []
        for index, choice in enumerate(choices):
            try:
                prepared.append(
                    await self.prepare(
                        engine,
                        model,
                        limits,
                        choice,
                        priority=priority,
                        deadline_s=deadline_s,
                        field=field,
                        chat=chat,
                        lora=lora,
                        encoded=encoded,
                    )
                )
            except RequestFailed as exc:
                raise refusal(exc, index) from None
        waiting_tokens = sum(len(request.prompt_ids) for request in prepared)
        most = engine.queue_limits.max_tokens
        if len(prepared) > 1 and waiting_tokens > most:
            self.rejected("invalid_argument", chat)
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the {len(prepared)} choices of this request hold {waiting_tokens} prompt tokens, and at most "
                f"{most} may wait at once (--max-waiting-tokens): ask for fewer",
            )
        started: list[tuple[Request, RequestStream]] = []
        try:
            for request in prepared:
                started.append((request, self.submit(engine, request, field=field, chat=chat)))
        except BaseException as exc:  # the queue filled or the engine closed meanwhile: none runs
            for _, stream in started:
                stream.abort(FinishReason.CANCELLED)
            if isinstance(exc, RequestFailed):
                raise refusal(exc, len(started)) from None
            raise
        return started

    def submit(self, engine: Engine, request: Request, *, field: str = "", chat: bool = False) -> RequestStream:
        """Hand a prepared request to the engine; a refusal is counted and raised as RequestFailed."""
        prefix = f"{field}." if field else ""
        try:
            return engine.submit(request)
        except QueueFullError as exc:
            raise self._queue_full(exc, prefix, chat) from None
        except DeadlineUnreachableError as exc:
            self.rejected("deadline_exceeded", chat)
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, prefix + str(exc)) from None
        except EngineClosedError as exc:
            self.rejected("unavailable", chat)
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    def chat_prompt(
        self, model: ServedModel, limits: Limits, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()
    ) -> str:
        """The prompt the model's chat template makes of `messages` (submit it with add_special_tokens=False);
        a refusal is counted and raised as RequestFailed: FAILED_PRECONDITION when the model has no template
        (the server's set-up, not the request, must change), else INVALID_ARGUMENT."""
        try:
            check_chat_size(messages, limits.max_prompt_bytes)
            return render_chat(model, messages, tools)
        except ChatError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            if exc.code == "no_template":
                code = grpc.StatusCode.FAILED_PRECONDITION
            self.rejected(code.name.lower(), chat=True)
            raise RequestFailed(code, str(exc)) from None

    def track(self, request: Request, prompt: str, chat: bool = False) -> OutcomeTracker:
        """The request's telemetry, under the current span (each face opens one per call); a chat's request
        is counted as gen_ai.operation.name "chat", a prompt's as "text_completion"."""
        cfg = self.config
        content = prompt if cfg.trace_content or cfg.log_content else None
        operation = CHAT_OPERATION if chat else OPERATION
        return OutcomeTracker(self._metrics, request, content, cfg.trace_content, cfg.log_content, operation)

    @contextlib.asynccontextmanager
    async def consuming(
        self,
        started: Sequence[tuple[Request, RequestStream]],
        prompts: Sequence[str],
        chat: bool,
        ending: Callable[[], FinishReason],
    ) -> AsyncIterator[AsyncGenerator[tuple[int, StreamEvent], None]]:
        """The one consume loop of every face, entered as soon as its choices have started: it yields their
        events as they come (each with its place in `started`), each recorded in its request's telemetry. On
        leaving, however the face stops (the last event, a failure it raises, its caller gone, before or while
        reading), every stream is aborted (a no-op once finished: the engine frees the row at its next step)
        and every outcome closed, with `ending()` saying why (a deadline passed, a cancel)."""
        outcomes = [self.track(request, prompt, chat) for (request, _), prompt in zip(started, prompts, strict=True)]

        def abort_all() -> None:
            reason = ending()
            for _, stream in started:
                stream.abort(reason)  # a no-op once it finished

        async def events() -> AsyncGenerator[tuple[int, StreamEvent], None]:
            try:
                async with contextlib.aclosing(_merged_streams([stream for _, stream in started])) as merged:
                    async for index, event in merged:
                        outcomes[index].saw(event)
                        yield index, event
            finally:  # a face that stops reading (a failure, a gone caller) stops every choice now
                abort_all()

        reading = events()
        try:
            yield reading
        finally:
            await reading.aclose()
            abort_all()  # also when reading never began
            for outcome in outcomes:
                outcome.close(ending().value)

    def rejected(self, error_type: str, chat: bool = False) -> None:
        """Count a request refused before generating, by `error_type` (a gRPC code's name), as a chat's or not."""
        if self._metrics is not None:
            self._metrics.request_rejected(error_type, CHAT_OPERATION if chat else OPERATION)

    def _queue_full(self, exc: QueueFullError, prefix: str, chat: bool) -> RequestFailed:
        self.rejected("resource_exhausted", chat)
        return RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, prefix + str(exc), exc.retry_after_s)

    # ---- drain --------------------------------------------------------------

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a generation call as in flight while the block runs: a drain waits for it."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_quiet(self, quiet_s: float, most_s: float) -> None:
        """Wait until no call has been refused for `quiet_s` (at most `most_s` in all): callers that still send
        to a draining server, on connections it keeps open, get its UNAVAILABLE rather than the CANCELLED a
        stopping transport gives the calls it finds in flight."""
        deadline = time.monotonic() + most_s
        while (left := deadline - time.monotonic()) > 0:
            self._refused.clear()
            try:
                await asyncio.wait_for(self._refused.wait(), min(quiet_s, left))
            except TimeoutError:
                return  # quiet

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no generation call is running; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def raise_for(event: StreamEvent) -> None:
    """Turn an engine-side ending the caller did not ask for into a RequestFailed."""
    assert event.finish is not None
    reason, error = event.finish.reason, event.finish.error
    if reason is FinishReason.ERROR:
        raise RequestFailed(grpc.StatusCode.INTERNAL, f"generation failed: {error}")
    if reason is FinishReason.OUT_OF_MEMORY:
        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"generation failed: {error}; retry")
    if reason is FinishReason.DEADLINE_EXCEEDED:
        raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while generating")
    if reason is FinishReason.CANCELLED:
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"generation was stopped: {error or 'cancelled'}")


def ended_early(context: grpc.aio.ServicerContext[Any, Any]) -> FinishReason:
    """Why a handler that stops reading its stream stops: its deadline passed, or the caller went away."""
    if ended_early_code(context) is grpc.StatusCode.DEADLINE_EXCEEDED:
        return FinishReason.DEADLINE_EXCEEDED
    return FinishReason.CANCELLED


def grpc_trailers(exc: RequestFailed) -> tuple[tuple[str, str], ...]:
    """gRPC's retry hint for a full queue; nothing for other refusals."""
    if exc.retry_after_s is None:
        return ()
    return ((RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)


async def _merged_streams(streams: Sequence[RequestStream]) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """Every stream's events as they come, each with its stream's place in `streams` (a request's several
    choices). Ended early (a failure, a gone caller), it waits for its tasks; its reader (Serving.consuming)
    aborts the streams, saying why."""
    if len(streams) == 1:  # the common case: no tasks
        async for event in streams[0]:
            yield 0, event
        return
    # Unbounded: each stream's events are bounded by its own output, and a pump must never wait on the reader.
    queue: asyncio.Queue[tuple[int, StreamEvent | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:  # handed to the reader, which raises it as a lone stream would
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def encode_prompt(model: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
    """`text`'s token ids, through tokenizing_work."""
    return await tokenizing_work(text, lambda: model.encode(text, add_special_tokens))


async def tokenizing_work(text: str, work: Callable[[], _T]) -> _T:
    """`work` on `text` (tokenizing it, decoding its tokens): at once for a short text, on a worker thread for
    a long one (the tokenizer lets go of the GIL, ModelInfo.encode), so the event loop keeps every other call's
    stream moving meanwhile. Measured with the bench's word tokenizer: about 0.5 us a token, so a 1 MiB prompt
    held the loop for about 100 ms."""
    if len(text) <= ON_LOOP_PROMPT_CHARS:
        return work()
    return await asyncio.to_thread(work)
