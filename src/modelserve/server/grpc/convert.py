"""modelserve.v1's messages and the server's types: GenerationParameters in, as the one parameter model
(core/params.py); engine events and results out. The one place that maps them to the contract."""

from __future__ import annotations

from modelserve_client.v1 import generation_pb2 as pb

from modelserve.engine.request import FinishReason, StreamEvent, TokenLogprob, TokenLogprobs
from modelserve.server.core.params import Parameters, StructuredOutput

# GenerationParameters' fields with presence (proto3 optional): unset is None.
_OPTIONAL = (
    *("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty"),
    *("presence_penalty", "frequency_penalty", "min_p", "prompt_logprobs"),
)

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE_EXCEEDED: pb.FINISH_REASON_DEADLINE_EXCEEDED,
    FinishReason.OUT_OF_MEMORY: pb.FINISH_REASON_ERROR,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def parameters(params: pb.GenerationParameters) -> Parameters:
    """A request's GenerationParameters as the one parameter model, unset fields None."""
    constraint = None
    if params.HasField("structured_output"):
        kind = params.structured_output.WhichOneof("constraint")
        if kind == "choice":
            constraint = StructuredOutput(kind, tuple(params.structured_output.choice.choices))
        elif kind is not None:
            constraint = StructuredOutput(kind, getattr(params.structured_output, kind))
    return Parameters(
        **{name: getattr(params, name) if params.HasField(name) else None for name in _OPTIONAL},
        logit_bias=tuple(sorted(params.logit_bias.items())),
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        truncate_input_tokens=params.truncate_input_tokens,
        include_stop_sequence=params.include_stop_sequence,
        n=params.n,
        structured_output=constraint,
    )


def logprobs_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    def one(t: TokenLogprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob, rank=t.rank)

    return pb.TokenLogprobs(chosen=one(lp.chosen), top=[one(t) for t in lp.top])


def _usage(n_prompt: int, event: StreamEvent) -> pb.Usage:
    return pb.Usage(input_tokens=n_prompt, output_tokens=event.output_tokens, cached_tokens=event.cached_tokens)


def response_proto(request_id: str, n_prompt: int, event: StreamEvent) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        text=event.text,
        token_ids=event.token_ids,
        logprobs=[logprobs_proto(lp) for lp in event.logprobs],
        usage=_usage(n_prompt, event),
        prompt_logprobs=[logprobs_proto(lp) for lp in event.prompt_logprobs],
    )
    if event.finish is not None:
        set_final(response, n_prompt, event)
    return response


def set_final(message: pb.GenerateResponse | pb.GenerateResult, n_prompt: int, event: StreamEvent) -> None:
    finish = event.finish
    assert finish is not None
    message.finish_reason = FINISH_REASONS[finish.reason]
    message.usage.CopyFrom(_usage(n_prompt, event))
    message.timings.CopyFrom(
        pb.Timings(
            queue_seconds=finish.timings.queue_s,
            time_to_first_token_seconds=finish.timings.time_to_first_token_s,
            total_seconds=finish.timings.total_s,
        )
    )
    message.seed = finish.seed
