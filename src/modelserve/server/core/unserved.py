"""What this server knows of and does not serve: one table for every face, and what each face reads.

A caller who asks for one of these must learn that it was not done, never get a plain answer that looks
as if it had been: the OpenAI face answers 400 naming the body's field, vLLM's face UNIMPLEMENTED naming
its field, with the same reason. Before this table each face kept its own list, and they disagreed (the
OpenAI face served `guided_json` as plain text while vLLM's refused `json_schema`).

A body field the OpenAI face does not know at all is ignored, as vLLM's server does (clients send
fields of newer API versions), and logged once per name, so an operator can tell what callers expect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unserved:
    """A feature this server lacks, and the fields that ask for it on each face."""

    reason: str
    openai: tuple[str, ...] = ()  # body fields of /v1/chat/completions and /v1/completions
    vllm: tuple[str, ...] = ()  # vLLM's GenerateRequest fields; its SamplingParams' as sampling_params.NAME


STRUCTURAL_TAGS = Unserved(
    "this server constrains output by JSON schema, regex, choice or grammar, not by structural tags",
    vllm=("sampling_params.structural_tag",),  # the OpenAI face's are inside response_format, structured_outputs
)
UNSERVED = (
    STRUCTURAL_TAGS,
    Unserved("this server calls tools given as `tools` (OpenAI's current API)", openai=("functions", "function_call")),
    Unserved(
        "this server takes text only",
        openai=("prompt_embeds", "audio"),
        vllm=("mm_inputs", "extra_mm_inputs", "media_refs"),
    ),
    Unserved(
        "this server does no prefill/decode disaggregation",
        openai=("kv_transfer_params",),
        vllm=("kv_transfer_params", "kv_transfer_params_json"),
    ),
    Unserved("this server has no beam search", openai=("use_beam_search",)),
    Unserved(
        "this server renders chats with the model's (or --chat-template's) template as it is",
        openai=("chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message"),
    ),
    Unserved(
        "this server restricts no tokens but by logit_bias (and stop_token_ids)",
        openai=("allowed_token_ids", "bad_words", "logits_processors"),
    ),
    Unserved(
        "this server always detokenizes without special tokens and returns text",
        openai=("skip_special_tokens", "return_tokens_as_token_ids"),
    ),
    Unserved("this server makes text only", openai=("modalities",)),
    Unserved("this server has no predicted outputs", openai=("prediction",)),
    Unserved("this server does no fill-in-the-middle", openai=("suffix",)),
)
_BY_OPENAI = {name: entry for entry in UNSERVED for name in entry.openai}
_BY_VLLM = {name: entry for entry in UNSERVED for name in entry.vllm}

# Values of an OpenAI field that ask for nothing (clients send some of them by default).
_OPENAI_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "functions": ([],),
    "function_call": ("none",),
    "chat_template_kwargs": ({},),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "allowed_token_ids": ([],),
    "bad_words": ([],),
    "logits_processors": ([],),
    "skip_special_tokens": (True,),
    "return_tokens_as_token_ids": (False,),
    "modalities": (["text"],),
    "use_beam_search": (False,),
}

# Body fields the OpenAI face reads and serves (openai/request.py), and OpenAI's fields that ask nothing of
# a server (who the caller is, whether OpenAI should store the answer): neither is logged as unknown.
OPENAI_SERVED = frozenset(
    {
        *("model", "messages", "prompt", "n", "best_of", "stream", "stream_options", "priority", "seed", "stop"),
        "stop_token_ids",
        *("max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p"),
        *("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos"),
        *("include_stop_str_in_output", "truncate_prompt_tokens", "logprobs", "top_logprobs"),
        *("echo", "prompt_logprobs", "tools", "tool_choice"),
        *("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"),
        "parallel_tool_calls",
        *("user", "store", "metadata", "service_tier"),
        # How a guided_* constraint is applied (this server picks its own grammar engine and compact JSON).
        *("guided_decoding_backend", "guided_whitespace_pattern"),
    }
)


def openai_refusal(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(the field, why it is refused) for the first body field that asks for a feature this server lacks."""
    for name, value in body.items():
        entry = _BY_OPENAI.get(name)
        if entry is None or value is None or value in _OPENAI_NEUTRAL.get(name, ()):
            continue
        return name, f"{name} {_shown(value)} is not supported: {entry.reason}"
    return None


def vllm_refusal(set_fields: Iterable[tuple[str, Any]]) -> str | None:
    """Why a vLLM Generate cannot be served as asked, for the first of `set_fields` (its fields that are set,
    sampling ones named sampling_params.NAME) that asks for a feature this server lacks."""
    for name, value in set_fields:
        entry = _BY_VLLM.get(name)
        if entry is None:
            continue
        shown = f" = {value}" if isinstance(value, int | float) and not isinstance(value, bool) else ""
        return f"{name}{shown} is not supported: {entry.reason}"
    return None


MAX_UNKNOWN_LOGGED = 100  # names remembered and logged; callers choose the names, so the log is bounded


class UnknownFields:
    """Logs each body field the OpenAI face does not know, once per name, for the first MAX_UNKNOWN_LOGGED
    names of the server's life."""

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def note(self, body: Mapping[str, Any]) -> None:
        for name in body:
            if name in OPENAI_SERVED or name in _BY_OPENAI or name[:80] in self._logged:
                continue
            if len(self._logged) >= MAX_UNKNOWN_LOGGED:
                return
            self._logged.add(name[:80])
            log.warning("ignoring the request field %r, which this server does not know (logged once)", name[:80])
            if len(self._logged) == MAX_UNKNOWN_LOGGED:
                log.warning("%d unknown request fields logged; further ones are ignored unlogged", MAX_UNKNOWN_LOGGED)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"({text[:77]}...)" if len(text) > 80 else f"({text})"
