"""A request's live state inside the engine core: its tokens, how many are in KV memory, its blocks.

Plain data, no tensors (the runner owns every tensor), so the scheduler that changes it can plan a
step another process executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelserve.engine.block_manager import BlockTable
from modelserve.engine.request import FinishReason, Request, SamplingParams
from modelserve.engine.step_plan import PromptScores


@dataclass(eq=False)
class Sequence:
    """Owned by the engine core alone."""

    key: int  # the frontend's id for the request, unique for the process
    request: Request
    tokens: list[int] = field(default_factory=list)  # prompt, then every output token
    computed: int = 0  # leading tokens whose keys and values are in KV memory
    table: BlockTable = field(default_factory=BlockTable)
    admitted: bool = False  # has left the waiting queue once (a preempted one goes back, but was admitted)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, at admission
    prompt_scores: PromptScores = field(default_factory=PromptScores)  # prompt log-probabilities so far
    lora_slot: int = 0  # the resident adapter slot it runs with while admitted (0: the base model)
    grammar_ready: bool = True  # False while the core builds its grammar's matcher: it may not be admitted
    long_prompt: bool = False  # had over LONG_PROMPT_CHUNKS chunks to compute at admission: fed the long chunk
    finish: FinishReason | None = None
    abort_reason: FinishReason | None = None  # set by an abort or a deadline; acted on at the next step
    abort_error: str = ""  # why, when the server (not the caller) ended the request

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt's log-probabilities are asked for and not yet sent (they go with the first token): every
        prompt position is computed, none taken from the prefix cache."""
        return self.params.prompt_logprobs >= 0 and self.output_len == 0

    @property
    def prefilling(self) -> bool:
        """Still computing its prompt (or, after a preemption, its prompt and output so far)."""
        return len(self.tokens) - self.computed > 1
