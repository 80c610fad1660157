"""Engine events and results as protobuf messages: the one place that maps engine types to the contract."""

from __future__ import annotations

from modelserve_client.v1 import generation_pb2 as pb

from modelserve.engine.request import FinishReason, StreamEvent, TokenLogprob, TokenLogprobs

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
