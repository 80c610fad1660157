"""GenerationService: protos in, engine requests out, engine events back as protos.

Every failure a caller can cause leaves here as a gRPC status with a message:
INVALID_ARGUMENT for bad input (validation.py says which field and range),
RESOURCE_EXHAUSTED when the waiting queue is full (with a `grpc-retry-pushback-ms`
trailer, gRPC's own retry hint) or a step ran out of memory, DEADLINE_EXCEEDED
when the deadline passed or the queue makes it impossible, UNAVAILABLE while the
model loads or the server drains, INTERNAL when the engine fails a request. A
handler that ends early for any reason (cancel, disconnect, deadline) aborts its
engine request in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import psutil
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from modelserve import __version__
from modelserve.config import Config
from modelserve.engine.request import (
    DeadlineUnreachableError,
    EngineClosedError,
    FinishReason,
    QueueFullError,
    Request,
    StreamEvent,
)
from modelserve.server.convert import logprobs_proto, response_proto, set_final
from modelserve.server.validation import (
    InvalidArgument,
    Limits,
    build_request,
    check_priority,
    check_prompt_size,
    resolve_defaults,
    truncate_prompt,
)
from modelserve.telemetry.call_status import ended_early_code
from modelserve.telemetry.metrics import GenerationMetrics
from modelserve.telemetry.request_outcome import OutcomeTracker

if TYPE_CHECKING:
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.models.loader import ModelInfo as ServedModel  # the name ModelInfo is an RPC here

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's retry hint (gRFC A6), read by clients' retry policies


class Phase(enum.Enum):
    LOADING = pb.SERVER_STATE_LOADING
    SERVING = pb.SERVER_STATE_SERVING
    DRAINING = pb.SERVER_STATE_DRAINING
    FAILED = pb.SERVER_STATE_FAILED


class _RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.trailers = trailers


class GenerationServicer(pb_grpc.GenerationServiceServicer):  # type: ignore[misc]  # untyped generated base
    """Serves one model through one engine, once `attach` has been called."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._started_s = time.monotonic()
        self.phase = Phase.LOADING
        self._model: ServedModel | None = None
        self._engine: Engine | None = None
        self._limits: Limits | None = None
        self._metrics: GenerationMetrics | None = None
        self._in_flight = 0  # Generate and BatchGenerate calls past admission, not yet ended
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, model: ServedModel, engine: Engine, metrics: GenerationMetrics | None = None) -> None:
        self._model, self._engine, self._metrics = model, engine, metrics
        cfg = self._config
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

    # ---- RPCs ---------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine, model, limits = await self._serving(context)
        with self._counted():
            async for response in self._generate(engine, model, limits, request, context):
                yield response

    async def _generate(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse],
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            engine_request, stream = self._start(engine, request, model, limits, context.time_remaining())
        except _RequestFailed as exc:
            await _abort(context, exc.code, str(exc), exc.trailers)
        request_id = engine_request.request_id
        n_prompt = len(engine_request.prompt_ids)
        outcome = self._track(engine_request, request.prompt)
        try:
            yield pb.GenerateResponse(request_id=request_id, usage=pb.Usage(input_tokens=n_prompt))
            async for event in stream:
                outcome.saw(event)
                yield response_proto(request_id, n_prompt, event)
                if event.finish is not None:
                    self._raise_for(event)
        except _RequestFailed as exc:
            await context.abort(exc.code, str(exc), exc.trailers)
        finally:
            stream.abort(_ended_early(context))
            outcome.close(_ended_early(context).value)

    async def BatchGenerate(
        self,
        request: pb.BatchGenerateRequest,
        context: grpc.aio.ServicerContext[pb.BatchGenerateRequest, pb.BatchGenerateResponse],
    ) -> pb.BatchGenerateResponse:
        engine, model, limits = await self._serving(context)
        n = len(request.requests)
        if not 1 <= n <= self._config.max_batch_requests:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests has {n} items; it must have 1 to {self._config.max_batch_requests}",
            )

        async def run_one(i: int, item: pb.GenerateRequest) -> pb.BatchItem:
            try:
                engine_request, stream = self._start(
                    engine, item, model, limits, context.time_remaining(), field=f"requests[{i}]"
                )
            except _RequestFailed as exc:
                return _item_error(exc)
            result = pb.GenerateResult(request_id=engine_request.request_id)
            outcome = self._track(engine_request, item.prompt)
            try:
                async for event in stream:
                    outcome.saw(event)
                    result.text += event.text
                    result.token_ids.extend(event.token_ids)
                    result.logprobs.extend(logprobs_proto(lp) for lp in event.logprobs)
                    if event.finish is not None:
                        self._raise_for(event)
                        set_final(result, len(engine_request.prompt_ids), event)
            except _RequestFailed as exc:
                return _item_error(exc)
            finally:
                stream.abort(_ended_early(context))
                outcome.close(_ended_early(context).value)
            return pb.BatchItem(result=result)

        with self._counted():
            items = await asyncio.gather(*(run_one(i, item) for i, item in enumerate(request.requests)))
        return pb.BatchGenerateResponse(items=items)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse]
    ) -> pb.TokenizeResponse:
        _, model, limits = await self._serving(context)
        try:
            check_prompt_size(request.text, limits, field="text")
        except InvalidArgument as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        encoding = model.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        response = pb.TokenizeResponse(token_ids=encoding.ids, token_count=len(encoding.ids))
        if request.return_tokens:
            response.tokens.extend(model.tokenizer.decode([t], skip_special_tokens=False) for t in encoding.ids)
        return response

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[pb.ModelInfoRequest, pb.ModelInfoResponse]
    ) -> pb.ModelInfoResponse:
        _, model, limits = await self._serving(context)
        defaults = limits.defaults
        return pb.ModelInfoResponse(
            model_id=model.model_id,
            architecture=model.architecture,
            model_type=model.model_type,
            vocab_size=model.vocab_size,
            max_sequence_length=limits.max_sequence_length,
            eos_token_ids=model.eos_token_ids,
            special_tokens=[pb.SpecialToken(role=r, token=t, token_id=i) for r, t, i in model.special_tokens],
            default_max_new_tokens=defaults.max_new_tokens,
            max_max_new_tokens=limits.max_max_new_tokens,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            is_demo=model.is_demo,
            generation_defaults=pb.GenerationDefaults(
                max_new_tokens=defaults.max_new_tokens,
                temperature=defaults.temperature,
                top_p=defaults.top_p,
                top_k=defaults.top_k,
                repetition_penalty=defaults.repetition_penalty,
                from_model=defaults.from_model,
            ),
        )

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[pb.HealthRequest, pb.HealthResponse]
    ) -> pb.HealthResponse:
        model, engine = self._model, self._engine
        stats = engine.stats() if engine is not None else None
        response = pb.HealthResponse(
            state=self.phase.value,
            model_loaded=self.phase is Phase.SERVING or (self.phase is Phase.DRAINING and model is not None),
            server_version=__version__,
            uptime_seconds=time.monotonic() - self._started_s,
            memory=pb.MemoryUsage(process_rss_bytes=_rss_bytes()),
        )
        if stats is not None:
            response.requests_running, response.requests_waiting = stats.running, stats.waiting
            response.waiting_tokens, response.max_batch_size = stats.waiting_tokens, stats.max_batch_size
            response.kv_cache_usage = stats.kv_usage
            response.kv_cache_tokens_used = stats.kv_tokens_used
            response.kv_cache_budget_tokens = stats.kv_budget_tokens
        if model is not None:
            response.model_id, response.device = model.model_id, str(model.device)
            response.dtype = str(model.dtype).removeprefix("torch.")
            if stats is not None:
                response.memory.gpu_allocated_bytes = stats.gpu_allocated_bytes
                response.memory.gpu_reserved_bytes = stats.gpu_reserved_bytes
        return response

    # ---- drain --------------------------------------------------------------

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no Generate or BatchGenerate call is running; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    # ---- helpers ------------------------------------------------------------

    async def _serving(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Engine, ServedModel, Limits]:
        if self.phase is Phase.SERVING and self._engine is not None and self._engine.alive:
            assert self._model is not None and self._limits is not None
            return self._engine, self._model, self._limits
        why = {
            Phase.LOADING: "the model is still loading; retry when grpc.health.v1 reports SERVING",
            Phase.DRAINING: "the server is shutting down; retry on another replica",
            Phase.FAILED: "the engine has failed; the server must be restarted",
        }.get(self.phase, "the engine is not running")
        self._rejected("unavailable")
        await _abort(context, grpc.StatusCode.UNAVAILABLE, why)

    def _track(self, request: Request, prompt: str) -> OutcomeTracker:
        cfg = self._config
        content = prompt if cfg.trace_content or cfg.log_content else None
        return OutcomeTracker(self._metrics, request, content, cfg.trace_content, cfg.log_content)

    def _rejected(self, error_type: str) -> None:
        if self._metrics is not None:
            self._metrics.request_rejected(error_type)

    def _start(
        self,
        engine: Engine,
        request: pb.GenerateRequest,
        model: ServedModel,
        limits: Limits,
        time_remaining_s: float | None,
        field: str = "",
    ) -> tuple[Request, RequestStream]:
        """Validate and submit one request; a refusal is counted and raised as _RequestFailed."""
        prefix = f"{field}." if field else ""
        try:
            engine.check_queue()  # before tokenizing: a refusal under overload must cost next to nothing
        except QueueFullError as exc:
            raise self._queue_full(exc, prefix) from None
        try:
            check_priority(request.priority)
            check_prompt_size(request.prompt, limits)
            prompt_ids = truncate_prompt(model.encode(request.prompt), request.params, limits)
            engine_request = build_request(request.request_id or uuid.uuid4().hex, prompt_ids, request.params, limits)
        except InvalidArgument as exc:
            self._rejected("invalid_argument")
            raise _RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc)) from None
        deadline_s = time.monotonic() + time_remaining_s if time_remaining_s is not None else None
        engine_request = dataclasses.replace(engine_request, priority=request.priority, deadline_s=deadline_s)
        try:
            return engine_request, engine.submit(engine_request)
        except QueueFullError as exc:
            raise self._queue_full(exc, prefix) from None
        except DeadlineUnreachableError as exc:
            self._rejected("deadline_exceeded")
            raise _RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, prefix + str(exc)) from None
        except EngineClosedError as exc:
            self._rejected("unavailable")
            raise _RequestFailed(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}") from None

    def _queue_full(self, exc: QueueFullError, prefix: str) -> _RequestFailed:
        self._rejected("resource_exhausted")
        pushback = ((RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
        return _RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, prefix + str(exc), pushback)

    def _raise_for(self, event: StreamEvent) -> None:
        """Turn an engine-side ending the caller did not ask for into a status."""
        assert event.finish is not None
        reason, error = event.finish.reason, event.finish.error
        if reason is FinishReason.ERROR:
            raise _RequestFailed(grpc.StatusCode.INTERNAL, f"generation failed: {error}")
        if reason is FinishReason.OUT_OF_MEMORY:
            raise _RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"generation failed: {error}; retry")
        if reason is FinishReason.DEADLINE_EXCEEDED:
            raise _RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while generating")
        if reason is FinishReason.CANCELLED:
            raise _RequestFailed(grpc.StatusCode.UNAVAILABLE, f"generation was stopped: {error or 'cancelled'}")


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    trailers: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    await context.abort(code, message, trailers)
    raise AssertionError("unreachable: context.abort raises")


def _ended_early(context: grpc.aio.ServicerContext[Any, Any]) -> FinishReason:
    """Why a handler that stops reading its stream stops: its deadline passed, or the caller went away."""
    if ended_early_code(context) is grpc.StatusCode.DEADLINE_EXCEEDED:
        return FinishReason.DEADLINE_EXCEEDED
    return FinishReason.CANCELLED


def _rss_bytes() -> int:
    """Resident memory of this process and its children (the engine core), so a leak in either shows."""
    me = psutil.Process()
    total: int = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may have just exited
            total += child.memory_info().rss
    return total


def _item_error(exc: _RequestFailed) -> pb.BatchItem:
    return pb.BatchItem(error=pb.ItemError(code=exc.code.value[0], message=str(exc)))
