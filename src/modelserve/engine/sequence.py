"""A request's live state inside the engine core: its tokens, its KV row and its finish."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelserve.engine.kv_cache import PrefillBuffer
from modelserve.engine.request import FinishReason, Request, SamplingParams


@dataclass(eq=False)
class Sequence:
    """Owned by the engine core alone."""

    key: int  # the frontend's id for the request, unique for the process
    request: Request
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None  # its row in the KV pool while it decodes
    finish: FinishReason | None = None
    abort_reason: FinishReason | None = None  # set by an abort or a deadline; acted on at the next step
    abort_error: str = ""  # why, when the server (not the caller) ended the request
    prefill: PrefillBuffer | None = None  # while the prompt is being prefilled
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

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
