"""Request validation: proto messages in, engine requests out, or a message that
names the field and its allowed range (sent as INVALID_ARGUMENT)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from modelserve_client.v1 import generation_pb2 as pb

from modelserve.engine.request import Request, SamplingParams


class InvalidArgument(ValueError):
    """A caller's mistake; str(exc) is what the caller is told."""


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server and model."""

    vocab_size: int
    max_sequence_length: int
    default_max_new_tokens: int
    max_max_new_tokens: int
    max_prompt_bytes: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    max_top_logprobs: int
    max_prompt_tokens: int
    max_request_id_chars: int = 128


PRIORITY_RANGE = (-1000, 1000)


def check_priority(priority: int, field: str = "priority") -> int:
    _in_range(field, priority, *PRIORITY_RANGE, note=" (higher is admitted first)")
    return priority


def check_prompt_size(prompt: str, limits: Limits, field: str = "prompt") -> None:
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_prompt_bytes:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {limits.max_prompt_bytes} bytes")


def truncate_prompt(prompt_ids: list[int], params: pb.GenerationParameters, limits: Limits) -> list[int]:
    keep = params.truncate_input_tokens
    if not 0 <= keep <= limits.max_sequence_length - 1:
        raise InvalidArgument(
            f"params.truncate_input_tokens must be in [0, {limits.max_sequence_length - 1}] (0 = never), got {keep}"
        )
    if not prompt_ids:
        raise InvalidArgument("prompt is empty: it must encode to at least one token")
    return prompt_ids[-keep:] if keep and len(prompt_ids) > keep else prompt_ids


def build_request(request_id: str, prompt_ids: list[int], params: pb.GenerationParameters, limits: Limits) -> Request:
    """Validate every parameter against `limits`; `prompt_ids` are already truncated."""
    n_prompt = len(prompt_ids)
    if n_prompt > limits.max_prompt_tokens:
        raise InvalidArgument(
            f"prompt is {n_prompt} tokens; the limit is {limits.max_prompt_tokens} "
            "(or set params.truncate_input_tokens)"
        )
    room = limits.max_sequence_length - n_prompt
    if room < 1:
        raise InvalidArgument(
            f"prompt is {n_prompt} tokens; a sequence holds {limits.max_sequence_length} tokens in all, so a prompt "
            f"may have at most {limits.max_sequence_length - 1} (or set params.truncate_input_tokens)"
        )
    if params.HasField("max_new_tokens"):
        max_new = params.max_new_tokens
        _in_range("params.max_new_tokens", max_new, 1, limits.max_max_new_tokens)
        if max_new > room:
            raise InvalidArgument(
                f"params.max_new_tokens is {max_new} but the prompt is {n_prompt} tokens and a sequence holds "
                f"{limits.max_sequence_length}: max_new_tokens may be at most {room} for this prompt "
                f"(or set params.truncate_input_tokens)"
            )
    else:
        max_new = min(limits.default_max_new_tokens, room)

    min_new = params.min_new_tokens if params.HasField("min_new_tokens") else 0
    _in_range("params.min_new_tokens", min_new, 0, max_new, note=" (at most max_new_tokens)")
    temperature = _float("params.temperature", params, 1.0, 0.0, 100.0, note=" (0 = greedy)")
    top_p = _float("params.top_p", params, 1.0, 0.0, 1.0, low_open=True)
    top_k = params.top_k if params.HasField("top_k") else 0
    _in_range("params.top_k", top_k, 0, limits.vocab_size, note=" (0 = off)")
    repetition_penalty = _float("params.repetition_penalty", params, 1.0, 0.0, 10.0, low_open=True, note=" (1 = off)")

    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgument(f"params.stop has {len(params.stop)} sequences; at most {limits.max_stop_sequences}")
    for i, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= limits.max_stop_sequence_chars:
            raise InvalidArgument(
                f"params.stop[{i}] is {len(stop)} characters; each must be 1 to {limits.max_stop_sequence_chars}"
            )
    if len(params.stop_token_ids) > limits.max_stop_sequences:
        raise InvalidArgument(
            f"params.stop_token_ids has {len(params.stop_token_ids)} ids; at most {limits.max_stop_sequences}"
        )
    for i, token_id in enumerate(params.stop_token_ids):
        _in_range(f"params.stop_token_ids[{i}]", token_id, 0, limits.vocab_size - 1)

    _in_range("params.top_logprobs", params.top_logprobs, 0, limits.max_top_logprobs)
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgument("params.top_logprobs needs params.logprobs = true")
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidArgument(f"request_id is {len(request_id)} characters; at most {limits.max_request_id_chars}")

    return Request(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids),
        params=SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=params.seed if params.HasField("seed") else secrets.randbits(63),
            repetition_penalty=repetition_penalty,
            stop=tuple(params.stop),
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            include_stop_sequence=params.include_stop_sequence,
        ),
    )


def _in_range(field: str, value: int, low: int, high: int, note: str = "") -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be in [{low}, {high}]{note}, got {value}")


def _float(
    field: str,
    params: pb.GenerationParameters,
    default: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    note: str = "",
) -> float:
    name = field.removeprefix("params.")
    if not params.HasField(name):
        return default
    value = float(getattr(params, name))
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{field} must be in {bracket}{low:g}, {high:g}]{note}, got {value:g}")
    return value
