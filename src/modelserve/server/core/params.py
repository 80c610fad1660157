"""The one parameter model: a generation's parameters as any face gives them, before validation.

Each face maps its own request into a `Parameters` (modelserve.v1's GenerationParameters in
grpc/convert.py, vLLM's SamplingParams in grpc/vllm.py, an OpenAI body in openai/request.py), and
validation.py checks it once, for all of them, into the engine's SamplingParams. None (or an empty
value) is "not set": the model's default from its generation_config.json, else the server's. Field names
are modelserve.v1's, which validation's messages name (`params.max_new_tokens`); each face rewords them
into the names its callers sent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: one of grammar.KINDS and its value (a JSON text, a regex, a grammar, the
    choices, or True for any JSON object)."""

    kind: str
    value: str | tuple[str, ...] | bool


@dataclass(frozen=True)
class Parameters:
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    truncate_input_tokens: int = 0
    include_stop_sequence: bool = False
    n: int = 0  # samples; 0 or 1: one
    structured_output: StructuredOutput | None = None
