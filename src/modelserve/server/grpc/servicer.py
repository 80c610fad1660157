"""GenerationService: protos in, engine requests out, engine events back as protos.

Every failure a caller can cause leaves here as a gRPC status with a message:
INVALID_ARGUMENT for bad input (validation.py says which field and range),
RESOURCE_EXHAUSTED when the waiting queue is full (with a `grpc-retry-pushback-ms`
trailer, gRPC's own retry hint) or a step ran out of memory, DEADLINE_EXCEEDED
when the deadline passed or the queue makes it impossible, UNAVAILABLE while the
model loads or the server drains, INTERNAL when the engine fails a request,
FAILED_PRECONDITION for a Chat when the model has no chat template. A
handler that ends early for any reason (cancel, disconnect, deadline) aborts its
engine request in `finally`. Validation, admission, the in-flight count a drain
waits on and request telemetry are shared with the HTTP app (serving.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import psutil
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from modelserve import __version__
from modelserve.engine.request import FinishReason, Request
from modelserve.models.lora import LoraAdapter
from modelserve.server.core.adapters import AdapterError
from modelserve.server.core.chat import ChatMessage
from modelserve.server.core.params import Parameters, StructuredOutput
from modelserve.server.core.serving import (
    Choice,
    Phase,
    RequestFailed,
    Serving,
    ended_early,
    grpc_trailers,
    raise_for,
    sample_choices,
    tokenizing_work,
)
from modelserve.server.core.tools import (
    HeldReply,
    Tool,
    ToolCall,
    ToolCalling,
    ToolChoice,
    ToolError,
    check_tools,
    constraint_for,
    parser_for,
)
from modelserve.server.core.validation import InvalidArgument, Limits, check_prompt_size
from modelserve.server.grpc.convert import logprobs_proto, parameters, response_proto, set_final

if TYPE_CHECKING:
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.models.loader import ModelInfo as ServedModel  # the name ModelInfo is an RPC here

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


HEALTH_HINT = "grpc.health.v1 reports SERVING"

# A header of every Generate and Chat stream the server accepts (never of a refusal, which stays trailers-only
# so that retry policies may retry it): which replica serves it, as host name (the pod's, on Kubernetes) and
# gRPC port, for a caller that balances over many.
SERVER_ID_KEY = "modelserve-server-id"


@dataclasses.dataclass(frozen=True)
class _Call:
    """What a Generate (or a rendered Chat) asks for, its parameters in the one parameter model."""

    prompt: str
    params: Parameters
    request_id: str
    priority: int
    adapter: str  # the LoRA adapter named ("" = the base model), not yet resolved


_TOOL_CHOICES = {
    pb.TOOL_CHOICE_UNSPECIFIED: "auto",
    pb.TOOL_CHOICE_AUTO: "auto",
    pb.TOOL_CHOICE_NONE: "none",
    pb.TOOL_CHOICE_REQUIRED: "required",
}
# A reply that ended by itself (not cut at its length, not cancelled) can be read as complete tool calls.
_ENDED_BY_ITSELF = (FinishReason.EOS_TOKEN, FinishReason.STOP_TOKEN, FinishReason.STOP_SEQUENCE)


class GenerationServicer(pb_grpc.GenerationServiceServicer):  # type: ignore[misc]  # untyped generated base
    """Serves one model through one engine, as `serving` (shared with the HTTP app) holds them."""

    def __init__(self, serving: Serving) -> None:
        self._serving_state = serving
        self._config = serving.config
        self._server_id = ((SERVER_ID_KEY, f"{socket.gethostname()}:{self._config.port}"),)

    # ---- RPCs ---------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine, model, limits = await self._serving(context)
        # aclosing: on a cancel the inner generator's cleanup (the engine abort) runs now, inside counted().
        call = _Call(request.prompt, parameters(request.params), request.request_id, request.priority, request.adapter)
        with self._serving_state.counted():
            async with contextlib.aclosing(self._generate(engine, model, limits, call, context)) as responses:
                async for response in responses:
                    yield response

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[pb.ChatRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The chat rendered by the model's template is a Generate prompt whose special tokens the template
        wrote (chat.py); from there on it is a Generate call, whose replies are read for tool calls when the
        chat offers tools (tools.py)."""
        engine, model, limits = await self._serving(context, chat=True)
        messages = [
            ChatMessage(
                m.role, m.content, tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls), m.tool_call_id
            )
            for m in request.messages
        ]
        params, calling = parameters(request.params), None
        try:
            tools, choice = self._chat_tools(request)
            prompt = self._serving_state.chat_prompt(model, limits, messages, tools if choice.mode != "none" else ())
            if choice.mode != "none":
                calling = ToolCalling(tools, choice, parser_for(model.chat_template, self._config.tool_call_parser))
                if (schema := constraint_for(tools, choice)) is not None:
                    if params.structured_output is not None:
                        self._serving_state.rejected("invalid_argument", chat=True)
                        raise RequestFailed(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "tool_choice REQUIRED or tool_choice_function cannot be combined with "
                            "params.structured_output: the calls are the reply's structure",
                        )
                    params = dataclasses.replace(params, structured_output=StructuredOutput("json_schema", schema))
        except RequestFailed as exc:
            await _abort(context, exc.code, str(exc))
        call = _Call(prompt, params, request.request_id, request.priority, request.adapter)
        with self._serving_state.counted():
            responses = self._generate(engine, model, limits, call, context, chat=True, calling=calling)
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response

    async def _generate(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        request: _Call,
        context: grpc.aio.ServicerContext[Any, pb.GenerateResponse],
        chat: bool = False,
        calling: ToolCalling | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """A Generate call's stream; a chat's prompt was rendered by its template, which wrote the special
        tokens, so the tokenizer adds none. With params.n samples, their messages interleave, each with its
        sample's index."""
        try:
            samples = self._samples(request.params.n, engine)
            lora = self._adapter(request.adapter, model, chat)
            choices = sample_choices(request.prompt, request.params, samples, request.request_id)
            started = await self._serving_state.start_choices(
                engine,
                model,
                limits,
                choices,
                priority=request.priority,
                time_remaining_s=context.time_remaining(),
                chat=chat,
                lora=lora,
            )
        except RequestFailed as exc:
            await _abort(context, exc.code, str(exc), grpc_trailers(exc))
        request_id = started[0][0].request_id
        held = [HeldReply(calling) for _ in started] if calling is not None else None
        prompts = [request.prompt] * len(started)
        try:
            async with self._serving_state.consuming(started, prompts, chat, lambda: ended_early(context)) as events:
                await context.send_initial_metadata(self._server_id)
                for index, (engine_request, _) in enumerate(started):
                    usage = pb.Usage(input_tokens=len(engine_request.prompt_ids))
                    yield pb.GenerateResponse(request_id=request_id, usage=usage, index=index)
                async for index, event in events:
                    response = response_proto(request_id, len(started[index][0].prompt_ids), event)
                    response.index = index
                    if held is not None:  # text that may be a tool call waits for the reply's end
                        response.text = held[index].feed(event.text)
                        if event.finish is not None:
                            content, calls = held[index].finish(event.finish.reason in _ENDED_BY_ITSELF)
                            response.text += content
                            response.tool_calls.extend(
                                pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls
                            )
                    yield response
                    if event.finish is not None:
                        raise_for(event)
        except RequestFailed as exc:
            await context.abort(exc.code, str(exc), grpc_trailers(exc))

    def _chat_tools(self, request: pb.ChatRequest) -> tuple[list[Tool], ToolChoice]:
        """The chat's tools and tool choice, checked (INVALID_ARGUMENT naming what is wrong)."""
        tools = []
        try:
            for i, tool in enumerate(request.tools):
                try:
                    parameters = (
                        json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
                    )
                except ValueError as exc:
                    raise ToolError(f"tools[{i}].parameters is not valid JSON: {exc}") from None
                tools.append(Tool(tool.name, tool.description, parameters))
            mode = _TOOL_CHOICES[request.tool_choice]
            parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
            return tools, check_tools(tools, mode, request.tool_choice_function, parallel)
        except ToolError as exc:
            self._serving_state.rejected("invalid_argument", chat=True)
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT, str(exc).replace("tool_choice names", "tool_choice_function names")
            ) from None

    def _samples(self, n: int, engine: Engine) -> int:
        """params.n as a count of samples (0 means 1), within what one call may ask for."""
        bound = self._serving_state.max_choices(engine)
        if not 0 <= n <= bound:
            self._serving_state.rejected("invalid_argument")
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"params.n must be in [0, {bound}] (0 or 1: one sample; --max-batch-requests and "
                f"--max-waiting-requests bound it), got {n}",
            )
        return max(1, n)

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
                engine_request, stream = await self._start(
                    engine, item, model, limits, context.time_remaining(), field=f"requests[{i}]"
                )
            except RequestFailed as exc:
                return _item_error(exc)
            result = pb.GenerateResult(request_id=engine_request.request_id)
            started = [(engine_request, stream)]
            try:
                async with self._serving_state.consuming(
                    started, [item.prompt], False, lambda: ended_early(context)
                ) as events:
                    async for _, event in events:
                        result.text += event.text
                        result.token_ids.extend(event.token_ids)
                        result.logprobs.extend(logprobs_proto(lp) for lp in event.logprobs)
                        result.prompt_logprobs.extend(logprobs_proto(lp) for lp in event.prompt_logprobs)
                        if event.finish is not None:
                            raise_for(event)
                            set_final(result, len(engine_request.prompt_ids), event)
            except RequestFailed as exc:
                return _item_error(exc)
            return pb.BatchItem(result=result)

        with self._serving_state.counted():
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

        def tokenize() -> tuple[list[int], list[str]]:
            ids = model.encode(request.text, request.add_special_tokens)
            if not request.return_tokens:
                return ids, []
            return ids, model.tokenizer.decode_batch([[t] for t in ids], skip_special_tokens=False)  # GIL let go

        ids, tokens = await tokenizing_work(request.text, tokenize)  # a long text's on a worker thread
        return pb.TokenizeResponse(token_ids=ids, token_count=len(ids), tokens=tokens)

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
            weight_bytes=model.weight_bytes or None,  # 0 (weights not loaded: never while serving) leaves it unset
            adapters=[_adapter_proto(a) for a in self._serving_state.adapters.loaded.values()],
            generation_defaults=pb.GenerationDefaults(
                max_new_tokens=defaults.max_new_tokens,
                temperature=defaults.temperature,
                top_p=defaults.top_p,
                top_k=defaults.top_k,
                repetition_penalty=defaults.repetition_penalty,
                min_p=defaults.min_p,
                from_model=defaults.from_model,
            ),
        )

    async def LoadLoraAdapter(
        self,
        request: pb.LoadLoraAdapterRequest,
        context: grpc.aio.ServicerContext[pb.LoadLoraAdapterRequest, pb.LoadLoraAdapterResponse],
    ) -> pb.LoadLoraAdapterResponse:
        try:
            adapter = await self._serving_state.adapters.load(request.name, request.path)
        except AdapterError as exc:
            await _abort(context, exc.code, str(exc))
        log.info("LoRA adapter %r loaded from %s", adapter.name, adapter.path)
        return pb.LoadLoraAdapterResponse(adapter=_adapter_proto(adapter))

    async def UnloadLoraAdapter(
        self,
        request: pb.UnloadLoraAdapterRequest,
        context: grpc.aio.ServicerContext[pb.UnloadLoraAdapterRequest, pb.UnloadLoraAdapterResponse],
    ) -> pb.UnloadLoraAdapterResponse:
        try:
            await self._serving_state.adapters.unload(request.name)
        except AdapterError as exc:
            await _abort(context, exc.code, str(exc))
        log.info("LoRA adapter %r unloaded", request.name)
        return pb.UnloadLoraAdapterResponse()

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[pb.HealthRequest, pb.HealthResponse]
    ) -> pb.HealthResponse:
        serving = self._serving_state
        model, engine, phase = serving.model, serving.engine, serving.health().phase
        stats = engine.stats() if engine is not None else None
        response = pb.HealthResponse(
            state=phase.value,
            model_loaded=phase is Phase.SERVING or (phase is Phase.DRAINING and model is not None),
            server_version=__version__,
            uptime_seconds=time.monotonic() - serving.started_s,
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
            if model.weight_bytes:
                response.weight_bytes = model.weight_bytes
            if stats is not None:
                response.memory.gpu_allocated_bytes = stats.gpu_allocated_bytes
                response.memory.gpu_reserved_bytes = stats.gpu_reserved_bytes
        return response

    # ---- helpers ------------------------------------------------------------

    def _adapter(self, name: str, model: ServedModel, chat: bool, field: str = "") -> str:
        """The LoRA adapter a request names ("" for none, or the model's own id); RequestFailed NOT_FOUND."""
        try:
            return self._serving_state.adapters.resolve(name, model.model_id)
        except AdapterError as exc:
            self._serving_state.rejected("not_found", chat)
            prefix = f"{field}.adapter: " if field else "adapter: "
            raise RequestFailed(exc.code, prefix + str(exc)) from None

    async def _serving(
        self, context: grpc.aio.ServicerContext[Any, Any], chat: bool = False
    ) -> tuple[Engine, ServedModel, Limits]:
        try:
            return self._serving_state.ready(HEALTH_HINT, chat)
        except RequestFailed as exc:
            await _abort(context, exc.code, str(exc))

    async def _start(
        self,
        engine: Engine,
        request: pb.GenerateRequest,
        model: ServedModel,
        limits: Limits,
        time_remaining_s: float | None,
        field: str = "",
        chat: bool = False,
    ) -> tuple[Request, RequestStream]:
        """Validate and submit one GenerateRequest of a batch; a refusal is raised as RequestFailed. A batch
        item is one sample: its result has no room for more."""
        if request.params.n > 1:
            self._serving_state.rejected("invalid_argument")
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}.params.n is {request.params.n}: a BatchGenerate item makes one sample (0 or 1); "
                "send an item per sample, or call Generate",
            )
        choice = Choice(request.prompt, parameters(request.params), request.request_id)
        lora = self._adapter(request.adapter, model, chat, field)
        (started,) = await self._serving_state.start_choices(
            engine,
            model,
            limits,
            [choice],
            priority=request.priority,
            time_remaining_s=time_remaining_s,
            field=field,
            chat=chat,
            lora=lora,
        )
        return started


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    trailers: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    await context.abort(code, message, trailers)
    raise AssertionError("unreachable: context.abort raises")


def _rss_bytes() -> int:
    """Resident memory of this process and its children (the engine core), so a leak in either shows."""
    me = psutil.Process()
    total: int = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may have just exited
            total += child.memory_info().rss
    return total


def _item_error(exc: RequestFailed) -> pb.BatchItem:
    return pb.BatchItem(error=pb.ItemError(code=exc.code.value[0], message=str(exc)))


def _adapter_proto(adapter: LoraAdapter) -> pb.LoraAdapter:
    return pb.LoraAdapter(name=adapter.name, path=adapter.path, rank=adapter.rank, modules=adapter.modules)
