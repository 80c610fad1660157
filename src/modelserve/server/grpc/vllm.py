"""The vLLM-compatible face: vLLM's `vllm.grpc.engine.VllmEngine` service over the same Serving as
GenerationService, on the same port (the contract and stubs of PyPI's smg-grpc-proto, pinned).

Routers, gateways and benchmark tools that speak gRPC to LLM servers speak vLLM's service; serving it lets
them use modelserve unchanged. A Generate here goes the way a modelserve.v1 one goes (Serving.start_choices: the
same validation and limits, priority 0, the call's deadline, admission, the in-flight count a drain waits
for, request telemetry; interceptors give it auth and RPC metrics as for every method). Only shapes differ:

- Input: text, tokenized here, or token ids, checked against the vocabulary.
- SamplingParams become the one parameter model (core/params.py); a field left at zero takes the model's
  default, as in modelserve.v1 (vLLM's servicer uses fixed defaults there). A value out of range is
  INVALID_ARGUMENT with the message modelserve.v1 gives, naming this contract's field
  (sampling_params.max_tokens).
- What the engine cannot do is refused by field name, never ignored: UNIMPLEMENTED for a feature it lacks,
  which a vLLM that has it would serve (unserved.py's table: multimodal inputs, KV transfer, structural
  tags; Embed), INVALID_ARGUMENT for a value outside this
  server (data_parallel_rank or dp_rank other than 0, as for any out-of-range value).
- Output: token ids and counts, no text (a router speaking this contract detokenizes itself): with
  `stream`, a chunk per engine event, then one GenerateComplete whose finish_reason is vLLM's: "length",
  "stop" (matched_stop names a stop token or string, not the model's EOS), "abort", "error".
- The constraint oneof (json_schema, regex, grammar, json_object, choice) is modelserve.v1's
  structured_output, with its checks: an invalid one is INVALID_ARGUMENT naming sampling_params.KIND.
- prompt_logprobs: every prompt token (the first with no value) in `input_logprobs`, on a sample's first
  chunk with `stream`, else on its GenerateComplete.
- GetTokenizer: the tokenizer files as one ZIP (tokenizer_bundle.py); FlushCache: the prefix cache's blocks
  no running request holds are dropped; GetLoads: vLLM's load fields, throughput and hit rate included;
  SubscribeKvEvents: the prefix cache's blocks as they are stored and removed, for cache-aware routing.
- n samples: one engine request each, run side by side (the scheduler computes their prompt once),
  every chunk and each sample's GenerateComplete carrying its `index`, as vLLM's messages do.

Abort: in vLLM an aborted request's stream ends with a last output whose finish_reason is "abort", which
its servicer sends as a GenerateComplete, status OK; so here. An ending the caller did not ask for (the
drain's grace period ran out, the engine failed the request, the deadline passed) sends the same last
message and then the status modelserve.v1 ends such a call with, so retry policies behave the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from modelserve import __version__
from modelserve.config import KV_BLOCK_TOKENS
from modelserve.engine import protocol
from modelserve.engine.block_manager import NO_KEY
from modelserve.engine.frontend import KvSubscriberLagged
from modelserve.engine.protocol import PROFILE_ACTIVITIES, PROFILE_MEMORY, KvEvent, KvStored
from modelserve.engine.request import EngineStats, FinishReason, Request, StreamEvent, TokenLogprobs
from modelserve.server.core.params import Parameters, StructuredOutput
from modelserve.server.core.serving import (
    Phase,
    RequestFailed,
    Serving,
    ended_early,
    grpc_trailers,
    raise_for,
    sample_choices,
)
from modelserve.server.core.unserved import vllm_refusal
from modelserve.server.core.validation import VLLM_NAMES, Limits, reworded
from modelserve.server.grpc import tokenizer_bundle

if TYPE_CHECKING:
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.models.loader import ModelInfo as ServedModel

SERVICE_NAME = vpb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
HEALTH_HINT = f"grpc.health.v1 reports SERVING for {SERVICE_NAME}"
SERVER_TYPE = "vllm-grpc"  # the contract this service speaks, as vLLM's servicer names it

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.CANCELLED: "abort",
    FinishReason.DEADLINE_EXCEEDED: "abort",
    FinishReason.OUT_OF_MEMORY: "error",
    FinishReason.ERROR: "error",
}

_INT32_MAX = 2**31 - 1
# The vLLM sampling parameters that modelserve.v1 names otherwise, so that a refusal names the field sent.
_RENAMED = {
    **VLLM_NAMES,
    "top_logprobs": "logprobs",
    **{f"structured_output.{kind}": kind for kind in ("json_schema", "json_object", "regex", "choice", "grammar")},
}
# The plain SamplingParams fields that the parameter model names alike.
_SAME_NAMES = ("top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")
# vLLM's sampling defaults that GetModelInfo reports when the model sets them.
_REPORTED_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")


@dataclass
class _Call:
    """A running Generate of this service, as Abort finds it by request_id."""

    stream: RequestStream
    aborted: bool = False  # by an Abort call: the caller's wish, so its ending is no failure


class VllmEngineServicer(vpb_grpc.VllmEngineServicer):  # type: ignore[misc]  # untyped generated base
    """vLLM's VllmEngine over `serving` (shared with GenerationService and the HTTP app)."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving
        self._calls: dict[str, list[_Call]] = {}  # request ids may repeat: Abort ends them all, as vLLM does
        self._last_receive_s = 0.0  # wall clock, for GetServerInfo
        self._tokenizer_bundle: tuple[bytes, str] | None = None  # GetTokenizer's ZIP and its SHA-256, once made
        self._profile_path = ""  # the trace file of the profile StartProfile began, until StopProfile

    # ---- RPCs ---------------------------------------------------------------

    async def Generate(
        self, request: vpb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[vpb.GenerateResponse]:
        self._last_receive_s = time.time()
        engine, model, limits = await self._ready(context)
        # aclosing: on a cancel the inner generator's cleanup (the engine abort) runs now, inside counted().
        with self._serving.counted():
            async with contextlib.aclosing(self._generate(engine, model, limits, request, context)) as responses:
                async for response in responses:
                    yield response

    async def _generate(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        request: vpb.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[vpb.GenerateResponse, None]:
        try:
            params = self._parameters(request, limits)
            prompt, prompt_ids = self._prompt(request)
            started = await self._start_samples(engine, model, limits, request, params, prompt, prompt_ids, context)
        except RequestFailed as exc:
            await context.abort(exc.code, _their_names(str(exc)), grpc_trailers(exc))
        request_id = request.request_id or started[0][0].request_id
        calls = [_Call(stream) for _, stream in started]
        self._calls.setdefault(request_id, []).extend(calls)
        with_top = params.top_logprobs > 0
        # Per sample: all its ids (for a complete message without chunks before it), logprobs, last token.
        output_ids: list[list[int]] = [[] for _ in started]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in started]
        prompt_logprobs: list[vpb.InputLogProbs | None] = [None] * len(started)
        last_token = [-1] * len(started)
        prompts = [prompt] * len(started)
        try:
            async with self._serving.consuming(started, prompts, False, lambda: ended_early(context)) as events:
                async for index, event in events:
                    n_prompt = len(started[index][0].prompt_ids)
                    if event.token_ids:
                        last_token[index] = event.token_ids[-1]
                    if event.prompt_logprobs:
                        prompt_logprobs[index] = _input_logprobs(started[index][0].prompt_ids, event.prompt_logprobs)
                    if request.stream:
                        if event.token_ids:
                            chunk = _chunk(event, n_prompt, with_top)
                            chunk.index = index
                            if (scored := prompt_logprobs[index]) is not None:  # on the first chunk only
                                chunk.input_logprobs.CopyFrom(scored)
                                prompt_logprobs[index] = None
                            yield vpb.GenerateResponse(chunk=chunk)
                    else:
                        output_ids[index] += event.token_ids
                        logprobs[index] += event.logprobs
                    if event.finish is not None:
                        if request.stream:  # as vLLM: the ids (and log-probabilities) of the last chunk again
                            output_ids[index], logprobs[index] = list(event.token_ids), list(event.logprobs)
                        complete = _complete(
                            event, n_prompt, output_ids[index], logprobs[index], with_top, last_token[index]
                        )
                        complete.index = index
                        if (scored := prompt_logprobs[index]) is not None:
                            complete.input_logprobs.CopyFrom(scored)
                        yield vpb.GenerateResponse(complete=complete)
                        if not calls[index].aborted:
                            raise_for(event)
        except RequestFailed as exc:
            await context.abort(exc.code, str(exc), grpc_trailers(exc))
        finally:
            registered = self._calls[request_id]
            for call in calls:
                registered.remove(call)
            if not registered:
                del self._calls[request_id]

    async def _start_samples(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits,
        request: vpb.GenerateRequest,
        params: Parameters,
        prompt: str,
        prompt_ids: Sequence[int] | None,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> list[tuple[Request, RequestStream]]:
        """sampling_params.n engine requests (0 means 1; Serving.start_choices): sample j draws from seed + j
        (mod 2**32, as the int32 seed is taken), its engine id is the request id then -1, -2, ..."""
        samples = max(1, request.sampling_params.n)
        bound = self._serving.max_choices(engine)
        if samples > bound:
            self._serving.rejected("invalid_argument")
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sampling_params.n is {samples}; at most {bound} (--max-batch-requests and --max-waiting-requests)",
            )
        choices = sample_choices(prompt, params, samples, request.request_id, prompt_ids, seed_modulus=2**32)
        return await self._serving.start_choices(
            engine, model, limits, choices, time_remaining_s=context.time_remaining()
        )

    async def Embed(self, request: vpb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Embed is not supported: this server serves generative models only (GetModelInfo.is_generation)",
        )

    async def HealthCheck(
        self, request: vpb.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> vpb.HealthCheckResponse:
        health = self._serving.health()
        return vpb.HealthCheckResponse(healthy=health.up, message=health.why)

    async def Abort(self, request: vpb.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]) -> vpb.AbortResponse:
        """End the named requests at the engine's next step; each stream sends its last message itself."""
        for request_id in request.request_ids:
            for call in self._calls.get(request_id, ()):
                call.aborted = True
                call.stream.abort(FinishReason.CANCELLED, "aborted by an Abort call")
        return vpb.AbortResponse()

    async def GetModelInfo(
        self, request: vpb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> vpb.GetModelInfoResponse:
        _, model, limits = await self._ready(context)
        specials = {role: token_id for role, _, token_id in model.special_tokens}
        defaults = {name: getattr(limits.defaults, name) for name in _REPORTED_DEFAULTS}
        from_model = {name: value for name, value in defaults.items() if name in limits.defaults.from_model}
        return vpb.GetModelInfoResponse(
            model_path=model.source,
            is_generation=True,
            max_context_length=limits.max_sequence_length,
            vocab_size=model.vocab_size,
            supports_vision=False,
            served_model_name=model.model_id,
            tokenizer_path=model.source,
            model_type=model.model_type,
            architectures=[model.architecture],
            eos_token_ids=model.eos_token_ids,
            pad_token_id=specials.get("pad", 0),
            bos_token_id=specials.get("bos", 0),
            max_req_input_len=limits.max_prompt_tokens,
            default_sampling_params_json=json.dumps(from_model, separators=(",", ":")) if from_model else "",
        )

    async def GetServerInfo(
        self, request: vpb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> vpb.GetServerInfoResponse:
        serving = self._serving
        stats = self._stats()
        response = vpb.GetServerInfoResponse(
            active_requests=stats.running + stats.waiting,
            is_paused=not serving.health().up,
            last_receive_timestamp=self._last_receive_s,
            uptime_seconds=time.monotonic() - serving.started_s,
            server_type=SERVER_TYPE,
            data_parallel_size=1,
            kv_cache_dtype="auto",
        )
        if serving.model is not None:
            response.block_size = KV_BLOCK_TOKENS
            response.model_dtype = str(serving.model.dtype)
        return response

    async def GetLoads(
        self, request: vpb.GetLoadsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> vpb.GetLoadsResponse:
        """vLLM's meanings, as the vllm: metric aliases give them: a prompt being prefilled is running.

        A draining (or failed) server's load poll fails UNAVAILABLE from the drain's first moment: a load report
        has no field to say so, and a failed poll is what takes a worker out of a router's choice (smg's)."""
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dp_rank is {request.dp_rank}; this server has one data-parallel rank, 0",
            )
        health = self._serving.health()
        if health.phase in (Phase.DRAINING, Phase.FAILED):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{health.why}; it takes no new requests")
        stats = self._stats()
        running, waiting = stats.running + stats.prefilling, stats.waiting - stats.prefilling
        load = vpb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=running + waiting,
            num_used_tokens=stats.kv_tokens_used,
            max_total_num_tokens=stats.kv_budget_tokens,
            token_usage=stats.kv_usage,
            gen_throughput=stats.generated_tokens_per_s,
            cache_hit_rate=(
                stats.prefix_cache_hit_tokens / stats.admitted_prompt_tokens if stats.admitted_prompt_tokens else 0.0
            ),
            utilization=running / stats.max_batch_size if stats.max_batch_size else 0.0,
            max_running_requests=stats.max_batch_size,
            # Queued prompt tokens: which of them the prefix cache will serve is known only at admission.
            num_waiting_uncached_tokens=stats.waiting_tokens,
        )
        return vpb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(), version=f"modelserve {__version__}", dp_rank_count=1, loads=[load]
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        """The tokenizer files as one ZIP (tokenizer_bundle.py), for a router that cannot read the model's."""
        _, model, _ = await self._ready(context)
        if self._tokenizer_bundle is None:
            self._tokenizer_bundle = await asyncio.to_thread(tokenizer_bundle.bundle, model)
        for data, sha256 in tokenizer_bundle.chunks(*self._tokenizer_bundle):
            yield common_pb2.GetTokenizerChunk(data=data, sha256=sha256)

    async def FlushCache(
        self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.FlushCacheResponse:
        """Drops the cached blocks no running request holds (those that are held stay shared): no request
        in flight is disturbed, so there is nothing to wait for whatever timeout_s says."""
        engine, _, _ = await self._ready(context)
        engine.flush_cache()
        return common_pb2.FlushCacheResponse(
            success=True, message="the prefix cache's blocks that no running request holds are dropped at the next step"
        )

    async def StartProfile(
        self, request: common_pb2.StartProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.ProfileResponse:
        """torch's profiler over the engine's steps (engine/step_profiler.py), into a trace file under the
        directory the operator gave with --profile-dir; `output_dir` may name a folder inside it."""
        engine, model, _ = await self._ready(context)
        root = self._serving.config.profile_dir
        if not root:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "profiling is off: start the server with --profile-dir DIR to allow StartProfile",
            )
        if self._profile_path:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a profile is already running into {self._profile_path}; call StopProfile first",
            )
        folder = Path(request.output_dir)
        if folder.is_absolute() or ".." in folder.parts:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_dir is {request.output_dir!r}; it must be a relative folder inside --profile-dir, "
                "without '..' (or empty for --profile-dir itself)",
            )
        activities = [name.upper() for name in request.activities]
        allowed = [*PROFILE_ACTIVITIES, PROFILE_MEMORY] if model.device.type == "cuda" else ["CPU", PROFILE_MEMORY]
        if unknown := [name for name in activities if name not in allowed]:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"activities {unknown} are not profiled on this {model.device.type} server; allowed: {allowed}",
            )
        if request.profile_by_stage:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "profile_by_stage is not supported: prefill and decode share each step's forward here",
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self._profile_path = str(Path(root) / folder / f"modelserve-{stamp}.trace.json")
        engine.start_profile(
            protocol.StartProfile(
                self._profile_path,
                request.start_step,
                request.num_steps,
                activities,
                request.with_stack,
                request.record_shapes,
            )
        )
        until = f"after {request.num_steps} steps or StopProfile" if request.num_steps else "at StopProfile"
        return common_pb2.ProfileResponse(
            success=True, message=f"profiling; the trace goes to {self._profile_path} {until}"
        )

    async def StopProfile(
        self, request: common_pb2.StopProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.ProfileResponse:
        engine, _, _ = await self._ready(context)
        path, self._profile_path = self._profile_path, ""
        if not path:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no profile is running; call StartProfile first")
        engine.stop_profile()
        return common_pb2.ProfileResponse(success=True, message=f"the trace is written to {path}")

    async def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """The prefix cache's blocks as they are stored and removed, one batch per engine step that changed it
        (from start_sequence_number, when the server still keeps it): what a cache-aware router indexes. A
        block's hash is the engine's own key, which chains its parent's and its 16 token ids."""
        engine, _, _ = await self._ready(context)
        event_id = 0
        try:
            async for batch in engine.kv_events(request.start_sequence_number):
                events = []
                for event in batch.events:
                    event_id += 1
                    events.append(_kv_event(event_id, event))
                yield common_pb2.KvEventBatch(
                    sequence_number=batch.sequence_number, timestamp=batch.timestamp_s, events=events, dp_rank=0
                )
        except KvSubscriberLagged as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; subscribe again")

    # ---- helpers ------------------------------------------------------------

    async def _ready(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Engine, ServedModel, Limits]:
        try:
            return self._serving.ready(HEALTH_HINT)
        except RequestFailed as exc:
            await context.abort(exc.code, str(exc))

    def _stats(self) -> EngineStats:
        engine = self._serving.engine
        return engine.stats() if engine is not None else EngineStats()

    def _parameters(self, request: vpb.GenerateRequest, limits: Limits) -> Parameters:
        """The request's parameters in the one parameter model, which Serving.prepare then validates;
        RequestFailed (counted) for what this server cannot honour."""
        sampling = request.sampling_params
        refusal = _unsupported(request, sampling)
        if refusal is not None:
            self._serving.rejected("unimplemented")
            raise RequestFailed(grpc.StatusCode.UNIMPLEMENTED, refusal)
        if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
            self._serving.rejected("invalid_argument")
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"data_parallel_rank is {request.data_parallel_rank}; this server has one data-parallel rank, 0",
            )
        # vLLM's counts are uint32, ours int32: a larger value is refused here, naming its field, before the copy
        # (which would raise), and validation then checks the server's own limits.
        for name in ("max_tokens", "min_tokens", "top_k"):
            self._check_int32(f"sampling_params.{name}", getattr(sampling, name))
        for i, token_id in enumerate(sampling.stop_token_ids):
            self._check_int32(f"sampling_params.stop_token_ids[{i}]", token_id)
        # proto3 cannot tell these zeros from unset: a zero takes the default (the model's where it sets one).
        fields: dict[str, Any] = {name: getattr(sampling, name) or None for name in _SAME_NAMES}
        if sampling.min_tokens:
            fields["min_new_tokens"] = sampling.min_tokens
        if sampling.HasField("temperature"):
            fields["temperature"] = sampling.temperature
        if sampling.HasField("max_tokens"):
            fields["max_new_tokens"] = sampling.max_tokens
        if sampling.HasField("seed"):
            fields["seed"] = sampling.seed % 2**32  # a negative int32 as its two's complement
        if sampling.HasField("logprobs"):
            fields["logprobs"], fields["top_logprobs"] = True, sampling.logprobs
        if sampling.HasField("prompt_logprobs"):
            fields["prompt_logprobs"] = sampling.prompt_logprobs
        constraint = sampling.WhichOneof("constraint")  # structural_tag was refused above
        if constraint == "choice":
            fields["structured_output"] = StructuredOutput("choice", tuple(sampling.choice.choices))
        elif constraint is not None:
            fields["structured_output"] = StructuredOutput(constraint, getattr(sampling, constraint))
        if sampling.HasField("truncate_prompt_tokens"):
            keep = sampling.truncate_prompt_tokens
            fields["truncate_input_tokens"] = limits.max_prompt_tokens if keep == -1 else keep
        return Parameters(
            **fields,
            logit_bias=tuple(sorted(sampling.logit_bias.items())),
            stop=tuple(sampling.stop),
            stop_token_ids=tuple(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            include_stop_sequence=sampling.include_stop_str_in_output,
        )

    def _check_int32(self, field: str, value: int) -> None:
        if value > _INT32_MAX:
            self._serving.rejected("invalid_argument")
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be in [0, {_INT32_MAX}], got {value}")

    def _prompt(self, request: vpb.GenerateRequest) -> tuple[str, Sequence[int] | None]:
        """The prompt text (for tokenized input only what telemetry may show) and its token ids, if sent."""
        which = request.WhichOneof("input")
        if which == "text":
            return request.text, None
        if which == "tokenized":
            return request.tokenized.original_text, request.tokenized.input_ids
        self._serving.rejected("invalid_argument")
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "input is not set: send text or tokenized")


def _unsupported(request: vpb.GenerateRequest, sampling: vpb.SamplingParams) -> str | None:
    """Why the request cannot be served as asked, naming the first field that asks for a missing feature."""
    fields = [(field.name, value) for field, value in request.ListFields()]  # the fields set
    fields += [(f"sampling_params.{field.name}", value) for field, value in sampling.ListFields()]
    return vllm_refusal(fields)


def _their_names(message: str) -> str:
    """A refusal that validation.py worded with modelserve.v1's field names, with this contract's."""

    def rename(ours: str | None) -> str:
        return "tokenized.input_ids" if ours is None else f"sampling_params.{_RENAMED.get(ours, ours)}"

    return reworded(message, rename)[0]


def _logprobs(logprobs: Sequence[TokenLogprobs], with_top: bool) -> vpb.OutputLogProbs:
    out = vpb.OutputLogProbs(
        token_logprobs=[lp.chosen.logprob for lp in logprobs], token_ids=[lp.chosen.token_id for lp in logprobs]
    )
    if with_top:
        out.top_logprobs.extend(_top(lp) for lp in logprobs)
    return out


def _kv_event(event_id: int, event: KvEvent) -> common_pb2.KvCacheEvent:
    if isinstance(event, KvStored):
        block = common_pb2.KvBlock(block_hash=event.key, token_ids=event.tokens, block_size=KV_BLOCK_TOKENS)
        stored = common_pb2.KvBlocksStored(blocks=[block])
        if event.parent != NO_KEY:
            stored.parent_block_hash = event.parent
        if event.lora:
            stored.lora_name = event.lora
        return common_pb2.KvCacheEvent(event_id=event_id, stored=stored)
    return common_pb2.KvCacheEvent(event_id=event_id, removed=common_pb2.KvBlocksRemoved(block_hashes=event.keys))


def _input_logprobs(prompt_ids: Sequence[int], scored: Sequence[TokenLogprobs]) -> vpb.InputLogProbs:
    """Every prompt token, the first without a log-probability (and with no alternatives)."""
    return vpb.InputLogProbs(
        token_ids=prompt_ids,
        token_logprobs=[vpb.InputTokenLogProb(), *(vpb.InputTokenLogProb(value=lp.chosen.logprob) for lp in scored)],
        top_logprobs=[vpb.TopLogProbs(), *(_top(lp) for lp in scored)],
    )


def _top(lp: TokenLogprobs) -> vpb.TopLogProbs:
    return vpb.TopLogProbs(values=[t.logprob for t in lp.top], token_ids=[t.token_id for t in lp.top])


def _chunk(event: StreamEvent, n_prompt: int, with_top: bool) -> vpb.GenerateStreamChunk:
    """One event's new tokens; its counts are the chunk's own, as vLLM sends them."""
    chunk = vpb.GenerateStreamChunk(
        token_ids=event.token_ids,
        prompt_tokens=n_prompt,
        completion_tokens=len(event.token_ids),
        cached_tokens=event.cached_tokens,
    )
    if event.logprobs:
        chunk.output_logprobs.CopyFrom(_logprobs(event.logprobs, with_top))
    return chunk


def _complete(
    event: StreamEvent,
    n_prompt: int,
    output_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs],
    with_top: bool,
    last_token: int,
) -> vpb.GenerateComplete:
    finish = event.finish
    assert finish is not None
    complete = vpb.GenerateComplete(
        output_ids=output_ids,
        finish_reason=FINISH_REASONS[finish.reason],
        prompt_tokens=n_prompt,
        completion_tokens=event.output_tokens,
        cached_tokens=event.cached_tokens,
    )
    if logprobs:
        complete.output_logprobs.CopyFrom(_logprobs(logprobs, with_top))
    if finish.reason is FinishReason.STOP_TOKEN:
        complete.matched_token_id = last_token
    elif finish.reason is FinishReason.STOP_SEQUENCE:
        complete.matched_stop_str = finish.stop_sequence
    return complete
