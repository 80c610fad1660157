"""Request validation: proto messages in, engine requests out, or a message that
names the field and its allowed range (sent as INVALID_ARGUMENT).

A parameter a request leaves unset takes the model's default from its
generation_config.json where the file sets a valid one (resolve_defaults, once
at start-up), else the server's own; a request's explicit value always wins.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelserve.config import DEFAULT_MAX_NEW_TOKENS
from modelserve.engine.grammar import GrammarError, grammar_for
from modelserve.engine.request import Request, SamplingParams
from modelserve.server.core.params import Parameters

if TYPE_CHECKING:
    from modelserve.models.loader import GenerationDefaults

log = logging.getLogger(__name__)

# The float parameters' ranges, (low, high, low_open, note), for requests and the model's defaults alike.
_FLOAT_RANGES = {
    "temperature": (0.0, 100.0, False, " (0 = greedy)"),
    "top_p": (0.0, 1.0, True, ""),
    "repetition_penalty": (0.0, 10.0, True, " (1 = off)"),
    "presence_penalty": (-2.0, 2.0, False, " (0 = off)"),
    "frequency_penalty": (-2.0, 2.0, False, " (0 = off)"),
    "min_p": (0.0, 1.0, False, " (0 = off)"),
}
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's


# GenerationParameters fields -> vLLM's names for them (its SamplingParams, and the extra body fields of its
# OpenAI-compatible API, which ours takes too), where they differ.
VLLM_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "truncate_input_tokens": "truncate_prompt_tokens",
    "include_stop_sequence": "include_stop_str_in_output",
}
_OUR_FIELD = re.compile(r"(?<![\w.])(?:params\.(\w+(?:\.\w+)*)|prompt_ids\b)")


class InvalidArgument(ValueError):
    """A caller's mistake; str(exc) is what the caller is told."""


def reworded(message: str, rename: Callable[[str | None], str]) -> tuple[str, list[str]]:
    """A refusal from here, which names modelserve.v1's fields (params.max_new_tokens, prompt_ids), in another
    contract's words: each field becomes rename(its GenerationParameters name, or None for prompt_ids).
    Also returns the new names in the order the message gives them. The other faces (the OpenAI-compatible
    HTTP API, vLLM's gRPC service) so tell a caller the field it sent."""
    renamed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        renamed.append(rename(match[1]))
        return renamed[-1]

    return _OUR_FIELD.sub(replace, message), renamed


@dataclass(frozen=True)
class RequestDefaults:
    """What a request's unset parameters take; the server's own unless `from_model` names them."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    from_model: tuple[str, ...] = ()  # the parameters whose default the model's generation_config.json set


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server and model, and what it gets when it does not ask."""

    vocab_size: int
    max_sequence_length: int
    defaults: RequestDefaults
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


def check_token_ids(token_ids: Sequence[int], limits: Limits, field: str = "prompt_ids") -> list[int]:
    """A prompt sent as token ids: each must be in the vocabulary, or the model's embedding lookup would
    fail the whole step, and with it every request in the batch."""
    ids = list(token_ids)
    if max(ids, default=0) >= limits.vocab_size or min(ids, default=0) < 0:
        for i, token_id in enumerate(ids):
            _in_range(f"{field}[{i}]", token_id, 0, limits.vocab_size - 1)
    return ids


def truncate_prompt(prompt_ids: list[int], params: Parameters, limits: Limits) -> list[int]:
    keep = params.truncate_input_tokens
    if not 0 <= keep <= limits.max_sequence_length - 1:
        raise InvalidArgument(
            f"params.truncate_input_tokens must be in [0, {limits.max_sequence_length - 1}] (0 = never), got {keep}"
        )
    if not prompt_ids:
        raise InvalidArgument("prompt is empty: it must encode to at least one token")
    return prompt_ids[-keep:] if keep and len(prompt_ids) > keep else prompt_ids


def build_request(request_id: str, prompt_ids: list[int], params: Parameters, limits: Limits) -> Request:
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
    if params.max_new_tokens is not None:
        max_new = params.max_new_tokens
        _in_range("params.max_new_tokens", max_new, 1, limits.max_max_new_tokens)
        if max_new > room:
            raise InvalidArgument(
                f"params.max_new_tokens is {max_new} but the prompt is {n_prompt} tokens and a sequence holds "
                f"{limits.max_sequence_length}: max_new_tokens may be at most {room} for this prompt "
                f"(or set params.truncate_input_tokens)"
            )
    else:
        max_new = min(limits.defaults.max_new_tokens, room)

    min_new = params.min_new_tokens or 0
    _in_range("params.min_new_tokens", min_new, 0, max_new, note=" (at most max_new_tokens)")
    defaults = limits.defaults
    temperature = _float(params, "temperature", defaults.temperature)
    top_p = _float(params, "top_p", defaults.top_p)
    top_k = defaults.top_k if params.top_k is None else params.top_k
    _check_top_k("params.top_k", top_k, limits.vocab_size)
    repetition_penalty = _float(params, "repetition_penalty", defaults.repetition_penalty)
    presence_penalty = _float(params, "presence_penalty", 0.0)
    frequency_penalty = _float(params, "frequency_penalty", 0.0)
    min_p = _float(params, "min_p", defaults.min_p)
    logit_bias = _logit_bias(params, limits.vocab_size)

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
    grammar = structured_output_grammar(params)
    prompt_logprobs = -1 if params.prompt_logprobs is None else params.prompt_logprobs  # -1: none
    if params.prompt_logprobs is not None:
        _in_range("params.prompt_logprobs", prompt_logprobs, 0, limits.max_top_logprobs)
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
            seed=secrets.randbits(63) if params.seed is None else params.seed,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            min_p=min_p,
            logit_bias=logit_bias,
            stop=params.stop,
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
            include_stop_sequence=params.include_stop_sequence,
        ),
    )


MAX_CONSTRAINT_BYTES = 256 << 10
MAX_CHOICES = 1024


def structured_output_grammar(params: Parameters) -> str:
    """The grammar for params.structured_output ("" for none), checked before the request is admitted."""
    constraint = params.structured_output
    if constraint is None or constraint.value is False:
        return ""
    kind, value = constraint.kind, constraint.value
    field = f"params.structured_output.{kind}"
    if isinstance(value, tuple):
        if not 1 <= len(value) <= MAX_CHOICES:
            raise InvalidArgument(f"{field} has {len(value)} strings; it must have 1 to {MAX_CHOICES}")
        size = sum(len(choice.encode()) for choice in value)
    else:
        size = len(value.encode()) if isinstance(value, str) else 0
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {MAX_CONSTRAINT_BYTES} bytes")
    try:
        return _grammar(kind, value)
    except GrammarError as exc:
        raise InvalidArgument(f"{field} {exc}") from None


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, value: str | tuple[str, ...] | bool) -> str:
    """Checked once per distinct constraint: a service sends the same schema again and again."""
    return grammar_for(kind, list(value) if isinstance(value, tuple) else value)


def _in_range(field: str, value: int, low: int, high: int, note: str = "") -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be in [{low}, {high}]{note}, got {value}")


def _float(params: Parameters, name: str, default: float) -> float:
    value = getattr(params, name)
    if value is None:
        return default
    value = float(value)
    _check_float(f"params.{name}", name, value)
    return value


def _logit_bias(params: Parameters, vocab_size: int) -> tuple[tuple[int, float], ...]:
    low, high = LOGIT_BIAS_RANGE
    for token_id, bias in sorted(params.logit_bias):
        _in_range(f"params.logit_bias key {token_id}", token_id, 0, vocab_size - 1, note=" (a token id)")
        if not (math.isfinite(bias) and low <= bias <= high):
            raise InvalidArgument(f"params.logit_bias[{token_id}] must be in [{low:g}, {high:g}], got {bias:g}")
    return tuple(sorted(params.logit_bias))


def _check_float(field: str, name: str, value: float) -> None:
    low, high, low_open, note = _FLOAT_RANGES[name]
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{field} must be in {bracket}{low:g}, {high:g}]{note}, got {value:g}")


def _check_top_k(field: str, value: int, vocab_size: int) -> None:
    _in_range(field, value, 0, vocab_size, note=" (0 = off)")


def resolve_defaults(
    model: GenerationDefaults, default_max_new_tokens: int, max_max_new_tokens: int, vocab_size: int
) -> RequestDefaults:
    """The defaults of this server for this model, logged once at start-up.

    An explicit --default-max-new-tokens (non-zero) wins over the model's max_new_tokens, which is capped at
    `max_max_new_tokens`. A model value outside the range a request may ask for is ignored with a warning:
    the server's limits bind the model's authors as they bind callers.
    """
    server = RequestDefaults()
    chosen: dict[str, float] = {}  # what the model sets and the server accepts, by parameter name
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
        value = getattr(model, name)
        if value is None:
            continue
        try:
            if name == "top_k":
                _check_top_k(name, value, vocab_size)
            else:
                _check_float(name, name, value)
        except InvalidArgument as exc:
            log.warning(
                "the model's generation_config.json: %s; ignored, requests that leave it unset get %g",
                exc,
                getattr(server, name),
            )
            continue
        chosen[name] = value

    max_new = default_max_new_tokens or server.max_new_tokens
    source = "--default-max-new-tokens" if default_max_new_tokens else "the server's default"
    model_max_new = model.max_new_tokens
    if model_max_new is not None and default_max_new_tokens:
        log.info(
            "--default-max-new-tokens %d overrides the model's generation_config.json max_new_tokens %d",
            default_max_new_tokens,
            model_max_new,
        )
        model_max_new = None
    elif model_max_new is not None and model_max_new < 1:
        log.warning(
            "the model's generation_config.json: max_new_tokens must be at least 1, got %d; ignored", model_max_new
        )
        model_max_new = None
    if model_max_new is not None:
        max_new, source = model_max_new, "the model's generation_config.json"
    if max_new > max_max_new_tokens:
        log.info(
            "default max_new_tokens %d (%s) is above the most a request may ask for (%d: --max-max-new-tokens, "
            "and the context less one); requests that leave it unset get %d",
            max_new,
            source,
            max_max_new_tokens,
            max_max_new_tokens,
        )
        max_new = max_max_new_tokens
    if model_max_new is not None:
        chosen["max_new_tokens"] = max_new
    if chosen:
        log.info(
            "defaults from the model's generation_config.json for requests that leave them unset: %s",
            ", ".join(f"{name}={value:g}" for name, value in chosen.items()),
        )
    return RequestDefaults(
        max_new_tokens=max_new,
        temperature=chosen.get("temperature", server.temperature),
        top_p=chosen.get("top_p", server.top_p),
        top_k=int(chosen.get("top_k", server.top_k)),
        repetition_penalty=chosen.get("repetition_penalty", server.repetition_penalty),
        min_p=chosen.get("min_p", server.min_p),
        from_model=tuple(chosen),
    )
