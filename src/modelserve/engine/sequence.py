"""A request's live state inside the engine: its tokens, text state and finish."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelserve.engine.detokenizer import IncrementalDetokenizer
from modelserve.engine.kv_cache import PrefillBuffer
from modelserve.engine.request import FinishReason, Request, SamplingParams
from modelserve.engine.stop import StopSequenceMatcher


@dataclass(eq=False)
class Sequence:
    """Owned by the engine thread alone."""

    key: int  # the engine's own id, unique for the process
    request: Request
    arrival_s: float
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    scheduled_s: float | None = None
    first_token_s: float | None = None
    finish: FinishReason | None = None
    abort_reason: FinishReason | None = None  # set by abort(); acted on at the next step
    abort_error: str = ""  # why, when the server (not the caller) ended the request
    prefill: PrefillBuffer | None = None  # while the prompt is being prefilled
    logprob_sum: float = 0.0  # of the output tokens, under the raw model distribution

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def need(self) -> int:
        """KV columns this sequence may grow to."""
        return self.request.need

    @property
    def prompt_left(self) -> int:
        done = self.prefill.past if self.prefill is not None else 0
        return len(self.request.prompt_ids) - done

    @property
    def seen_ids(self) -> list[int]:
        return [*self.request.prompt_ids, *self.output_ids]
