"""GenerationService: protos in, engine requests out, engine events back as protos.

Every failure a caller can cause leaves here as a gRPC status with a message:
INVALID_ARGUMENT for bad input (validation.py says which field and range),
UNAVAILABLE while the model loads or the server drains, INTERNAL when the
engine fails a request. A handler that ends early for any reason (cancel,
disconnect, deadline) aborts its engine request in `finally`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import psutil
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from opentelemetry import trace

from modelserve import __version__
from modelserve.config import Config
from modelserve.engine.request import (
    EngineClosedError,
    FinishReason,
    Request,
    StreamEvent,
    TokenLogprob,
    TokenLogprobs,
)
from modelserve.server.validation import InvalidArgument, Limits, build_request, check_prompt_size, truncate_prompt
from modelserve.telemetry.metrics import GenerationMetrics, RequestOutcome

if TYPE_CHECKING:
    from modelserve.engine.engine import Engine, RequestStream
    from modelserve.models.loader import LoadedModel

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE_EXCEEDED: pb.FINISH_REASON_DEADLINE_EXCEEDED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


class Phase(enum.Enum):
    LOADING = pb.SERVER_STATE_LOADING
    SERVING = pb.SERVER_STATE_SERVING
    DRAINING = pb.SERVER_STATE_DRAINING
    FAILED = pb.SERVER_STATE_FAILED


class _RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class GenerationServicer(pb_grpc.GenerationServiceServicer):  # type: ignore[misc]  # untyped generated base
    """Serves one model through one engine, once `attach` has been called."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._started_s = time.monotonic()
        self.phase = Phase.LOADING
        self._model: LoadedModel | None = None
        self._engine: Engine | None = None
        self._limits: Limits | None = None
        self._metrics: GenerationMetrics | None = None

    def attach(self, model: LoadedModel, engine: Engine, metrics: GenerationMetrics | None = None) -> None:
        self._model, self._engine, self._metrics = model, engine, metrics
        cfg = self._config
        self._limits = Limits(
            vocab_size=model.vocab_size,
            max_sequence_length=engine.max_sequence_tokens,
            default_max_new_tokens=min(cfg.default_max_new_tokens, cfg.max_max_new_tokens),
            max_max_new_tokens=min(cfg.max_max_new_tokens, engine.max_sequence_tokens - 1),
            max_prompt_bytes=cfg.max_prompt_bytes,
            max_stop_sequences=cfg.max_stop_sequences,
            max_stop_sequence_chars=cfg.max_stop_sequence_chars,
            max_top_logprobs=cfg.max_top_logprobs,
        )

    # ---- RPCs ---------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine, model, limits = await self._serving(context)
        try:
            engine_request, stream = self._start(engine, request, model, limits)
        except _RequestFailed as exc:
            await _abort(context, exc.code, str(exc))
        request_id = engine_request.request_id
        n_prompt = len(engine_request.prompt_ids)
        outcome = _OutcomeTracker(self._metrics, n_prompt, self._traced_prompt(request.prompt))
        try:
            yield pb.GenerateResponse(request_id=request_id, usage=pb.Usage(input_tokens=n_prompt))
            async for event in stream:
                outcome.saw(event)
                yield _response(request_id, n_prompt, event)
                if event.finish is not None:
                    self._raise_for(event)
        except _RequestFailed as exc:
            await context.abort(exc.code, str(exc))
        finally:
            stream.abort()
            outcome.close(context)

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
                engine_request, stream = self._start(engine, item, model, limits, field=f"requests[{i}]")
            except _RequestFailed as exc:
                return _item_error(exc)
            result = pb.GenerateResult(request_id=engine_request.request_id)
            outcome = _OutcomeTracker(self._metrics, len(engine_request.prompt_ids), self._traced_prompt(item.prompt))
            try:
                async for event in stream:
                    outcome.saw(event)
                    result.text += event.text
                    result.token_ids.extend(event.token_ids)
                    result.logprobs.extend(_logprobs(lp) for lp in event.logprobs)
                    if event.finish is not None:
                        self._raise_for(event)
                        _set_final(result, len(engine_request.prompt_ids), event)
            except _RequestFailed as exc:
                return _item_error(exc)
            finally:
                stream.abort()
                outcome.close(context)
            return pb.BatchItem(result=result)

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
        return pb.ModelInfoResponse(
            model_id=model.model_id,
            architecture=model.architecture,
            model_type=model.model_type,
            vocab_size=model.vocab_size,
            max_sequence_length=limits.max_sequence_length,
            eos_token_ids=model.eos_token_ids,
            special_tokens=[pb.SpecialToken(role=r, token=t, token_id=i) for r, t, i in model.special_tokens],
            default_max_new_tokens=limits.default_max_new_tokens,
            max_max_new_tokens=limits.max_max_new_tokens,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            is_demo=model.is_demo,
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
            requests_running=stats.running if stats else 0,
            requests_waiting=stats.waiting if stats else 0,
            memory=pb.MemoryUsage(process_rss_bytes=psutil.Process().memory_info().rss),
        )
        if model is not None:
            response.model_id, response.device = model.model_id, str(model.device)
            response.dtype = str(model.dtype).removeprefix("torch.")
            if model.device.type == "cuda":
                import torch

                response.memory.gpu_allocated_bytes = torch.cuda.memory_allocated(model.device)
                response.memory.gpu_reserved_bytes = torch.cuda.memory_reserved(model.device)
        return response

    # ---- helpers ------------------------------------------------------------

    async def _serving(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Engine, LoadedModel, Limits]:
        if self.phase is Phase.SERVING and self._engine is not None and self._engine.alive:
            assert self._model is not None and self._limits is not None
            return self._engine, self._model, self._limits
        why = {
            Phase.LOADING: "the model is still loading; retry when grpc.health.v1 reports SERVING",
            Phase.DRAINING: "the server is shutting down",
            Phase.FAILED: "the engine has failed; the server must be restarted",
        }.get(self.phase, "the engine is not running")
        self._rejected("unavailable")
        await _abort(context, grpc.StatusCode.UNAVAILABLE, why)

    def _traced_prompt(self, prompt: str) -> str | None:
        return prompt if self._config.trace_content else None

    def _rejected(self, error_type: str) -> None:
        if self._metrics is not None:
            self._metrics.request_rejected(error_type)

    def _start(
        self, engine: Engine, request: pb.GenerateRequest, model: LoadedModel, limits: Limits, field: str = ""
    ) -> tuple[Request, RequestStream]:
        """Validate and submit one request; a refusal is counted and raised as _RequestFailed."""
        prefix = f"{field}." if field else ""
        try:
            check_prompt_size(request.prompt, limits)
            prompt_ids = truncate_prompt(model.encode(request.prompt), request.params, limits)
            engine_request = build_request(request.request_id or uuid.uuid4().hex, prompt_ids, request.params, limits)
        except InvalidArgument as exc:
            self._rejected("invalid_argument")
            raise _RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc)) from None
        try:
            return engine_request, engine.submit(engine_request)
        except EngineClosedError as exc:
            self._rejected("unavailable")
            raise _RequestFailed(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}") from None

    def _raise_for(self, event: StreamEvent) -> None:
        """Turn an engine-side ending the caller did not ask for into a status."""
        assert event.finish is not None
        reason = event.finish.reason
        if reason is FinishReason.ERROR:
            raise _RequestFailed(grpc.StatusCode.INTERNAL, f"generation failed: {event.finish.error}")
        if reason is FinishReason.CANCELLED:
            raise _RequestFailed(
                grpc.StatusCode.UNAVAILABLE, f"generation was stopped: {event.finish.error or 'cancelled'}"
            )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class _OutcomeTracker:
    """Follows one request's events; tells its span the story (queued, admitted, first token,
    finished) and the metrics how it ended, also when it ends early. No prompt or output text."""

    def __init__(self, metrics: GenerationMetrics | None, input_tokens: int, prompt: str | None = None) -> None:
        """`prompt` is given only when the operator turned content tracing on."""
        self._metrics = metrics
        self._prompt = prompt
        self._output: list[str] = []
        self._span = trace.get_current_span()  # the RPC's span, from the tracing interceptor
        self._input_tokens = input_tokens
        self._start_s = time.monotonic()
        self._start_ns = time.time_ns()
        self._first_token_s: float | None = None
        self._output_tokens = 0
        self._reported = False
        self._span.add_event("queued", {"gen_ai.usage.input_tokens": input_tokens})

    def saw(self, event: StreamEvent) -> None:
        if event.token_ids and self._first_token_s is None:
            self._first_token_s = time.monotonic() - self._start_s
            self._span.add_event("first_token")
        self._output_tokens = event.output_tokens
        if self._prompt is not None:
            self._output.append(event.text)
        if event.finish is not None and not self._reported:
            timings = event.finish.timings
            ttft = timings.time_to_first_token_s if event.output_tokens else None
            self._report(event.finish.reason.value, timings.queue_s, ttft, timings.total_s, event.finish.mean_logprob)

    def close(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The handler is ending: a request with no finish event was cancelled or ran out of time."""
        if self._reported:
            return
        remaining = context.time_remaining()
        reason = FinishReason.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else FinishReason.CANCELLED
        elapsed = time.monotonic() - self._start_s
        self._report(reason.value, self._first_token_s or elapsed, self._first_token_s, elapsed)

    def _report(
        self, reason: str, queue_s: float, ttft_s: float | None, total_s: float, mean_logprob: float | None = None
    ) -> None:
        self._reported = True
        self._span.add_event("admitted", timestamp=self._start_ns + int(queue_s * 1e9))
        self._span.add_event("finished", {"gen_ai.response.finish_reasons": [reason]})
        self._span.set_attributes(
            {
                "gen_ai.usage.input_tokens": self._input_tokens,
                "gen_ai.usage.output_tokens": self._output_tokens,
                "gen_ai.response.finish_reasons": [reason],
            }
        )
        if self._prompt is not None:
            self._span.set_attributes({"gen_ai.prompt": self._prompt, "gen_ai.completion": "".join(self._output)})
        if self._metrics is not None:
            self._metrics.request_finished(
                RequestOutcome(self._input_tokens, self._output_tokens, reason, queue_s, ttft_s, total_s, mean_logprob)
            )


def _item_error(exc: _RequestFailed) -> pb.BatchItem:
    return pb.BatchItem(error=pb.ItemError(code=exc.code.value[0], message=str(exc)))


def _logprobs(lp: TokenLogprobs) -> pb.TokenLogprobs:
    def one(t: TokenLogprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)

    return pb.TokenLogprobs(chosen=one(lp.chosen), top=[one(t) for t in lp.top])


def _response(request_id: str, n_prompt: int, event: StreamEvent) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        text=event.text,
        token_ids=event.token_ids,
        logprobs=[_logprobs(lp) for lp in event.logprobs],
        usage=pb.Usage(input_tokens=n_prompt, output_tokens=event.output_tokens),
    )
    if event.finish is not None:
        _set_final(response, n_prompt, event)
    return response


def _set_final(message: pb.GenerateResponse | pb.GenerateResult, n_prompt: int, event: StreamEvent) -> None:
    finish = event.finish
    assert finish is not None
    message.finish_reason = _FINISH[finish.reason]
    message.usage.CopyFrom(pb.Usage(input_tokens=n_prompt, output_tokens=event.output_tokens))
    message.timings.CopyFrom(
        pb.Timings(
            queue_seconds=finish.timings.queue_s,
            time_to_first_token_seconds=finish.timings.time_to_first_token_s,
            total_seconds=finish.timings.total_s,
        )
    )
    message.seed = finish.seed
