"""A request's parameters, the events it produces, and why it finished.

These plain types are the engine's whole interface to the outside: the server
builds a Request, the engine answers with StreamEvents.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a sequence stopped; the server maps these onto the proto enum."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OUT_OF_MEMORY = "out_of_memory"  # a step ran out of device memory; the request may be retried
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. Already validated: the engine trusts these."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # subtracted per time each token was generated so far
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int = -1  # -1: none; else each prompt token's log-probability and this many alternatives
    grammar: str = ""  # structured output: the llguidance grammar the output must match (grammar.py); "" = none
    include_stop_sequence: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One prompt, already tokenized, with its parameters."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0  # higher is admitted first; equal priorities are first come, first served
    deadline_s: float | None = None  # time.monotonic() after which the request is dropped
    lora: str = ""  # the LoRA adapter its tokens go through ("" = the base model)

    @property
    def need(self) -> int:
        """KV tokens the whole sequence may grow to (prompt + max_new_tokens)."""
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    rank: int = 0  # 1 = the likeliest token; 0 = not computed (it is for prompt tokens)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the most likely alternatives."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival at the engine."""

    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    timings: Timings
    seed: int
    error: str = ""  # why, for FinishReason.ERROR and OUT_OF_MEMORY and for a server-side cancel
    mean_logprob: float | None = None  # mean raw log-probability of the output tokens (a confidence signal)
    stop_sequence: str = ""  # the stop sequence that ended it, for FinishReason.STOP_SEQUENCE


@dataclass(frozen=True)
class StreamEvent:
    """What one engine step added to one request's output.

    `text` is settled text only: an incomplete UTF-8 character or text that may
    still become a stop sequence waits for a later event. `finish` is set on the
    last event of a request, and only there.
    """

    text: str
    token_ids: tuple[int, ...]
    output_tokens: int  # generated so far, in all
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish: Finish | None = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (known from the first token on)
    # With the first event, when params.prompt_logprobs asks: one per prompt token from the second on (the
    # first has no log-probability), under the model's raw distribution.
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did, for whoever observes the engine (telemetry)."""

    batch_size: int  # rows decoded together
    prefill_tokens: int
    prefill_s: float
    decode_s: float
    step_s: float = 0.0  # the whole step, scheduling included


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, safe to read from any thread."""

    running: int = 0  # rows decoding
    waiting: int = 0  # queued or being prefilled
    prefilling: int = 0  # of those waiting, the ones admitted whose prompt is being prefilled
    kv_budget_tokens: int = 0
    kv_tokens_used: int = 0  # tokens held by decoding rows
    prefix_cache_budget_tokens: int = 0  # the prefix cache's share of the KV budget (0: off)
    prefix_cache_tokens: int = 0  # tokens it holds
    prefix_cache_hit_tokens: int = 0  # prompt tokens it saved from prefilling, since the start
    admitted_prompt_tokens: int = 0  # prompt tokens of the requests admitted, since the start
    generated_tokens_per_s: float = 0.0  # output tokens a second over the last THROUGHPUT_WINDOW_S (frontend)
    waiting_tokens: int = 0  # prompt tokens of the queued requests
    max_batch_size: int = 0  # rows allowed now (lowered after an out-of-memory step)
    gpu_allocated_bytes: int = 0  # by the engine's tensors, on CUDA
    gpu_reserved_bytes: int = 0  # by its caching allocator, on CUDA
    lora_running: tuple[str, ...] = ()  # the LoRA adapters of the requests in the batch
    lora_waiting: tuple[str, ...] = ()  # and of the requests waiting for it

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV budget held by live tokens."""
        return self.kv_tokens_used / self.kv_budget_tokens if self.kv_budget_tokens else 0.0


class EngineClosedError(RuntimeError):
    """The engine was shut down or died; it takes no more requests."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; `retry_after_s` estimates when a place frees up."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineUnreachableError(RuntimeError):
    """The queue ahead of a request needs longer than its deadline leaves, even at the fastest prefill seen."""
