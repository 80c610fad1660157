"""One engine step, as plain data: what the scheduler decided and the runner executes.

No tensors and no references to the scheduler's objects: a plan can be pickled or msgpack-encoded
and sent to another process (a tensor-parallel rank) as it is. The runner turns it into its input
tensors; the KV memory it names by block id is the runner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelserve.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class PromptScoring:
    """Which of a prompt chunk's tokens are scored: the log-probability, at the fed tokens from index `first`
    on, of the prompt token that follows each (`targets`), with `top` alternatives."""

    first: int
    targets: list[int]
    top: int


@dataclass(slots=True)
class PromptScores:
    """Per scored prompt token: its log-probability, its rank in the vocabulary (1 = the likeliest) and the
    likeliest alternatives."""

    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logprobs)

    def extend(self, other: PromptScores) -> None:
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs


@dataclass(frozen=True, slots=True)
class RowPlan:
    """One sequence's share of the step's forward."""

    key: int
    token_ids: list[int]  # fed this step: one for a decoding row, a chunk for a prompt
    start: int  # the position of token_ids[0]; the row attends to positions [0, start + len(token_ids))
    block_table: list[int]  # the blocks that hold those positions, in order
    sample: bool  # the fed tokens end the sequence: sample its next token from the last one's logits
    scoring: PromptScoring | None = None  # prompt log-probabilities asked for from this chunk
    lora_slot: int = 0  # the adapter slot its tokens go through (engine/lora.py; 0: none)


@dataclass(frozen=True, slots=True)
class NewRow:
    """A sequence the runner has not seen: it sets up the sequence's sampling state."""

    key: int
    params: SamplingParams
    prompt_ids: tuple[int, ...]  # for penalties over the whole context


@dataclass(slots=True)
class StepPlan:
    rows: list[RowPlan] = field(default_factory=list)  # decoding rows first, then prompt chunks
    added: list[NewRow] = field(default_factory=list)  # sampling state to create before the step
    removed: list[int] = field(default_factory=list)  # keys whose sampling state goes (they ended)
    lora_loads: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter) to load before the step

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)

    @property
    def sampled_keys(self) -> list[int]:
        return [row.key for row in self.rows if row.sample]
