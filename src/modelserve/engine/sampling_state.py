"""Each running request's sampling state, kept by the runner from its first step to its last.

Made once when a request first appears in a step plan, updated with each token it samples, dropped
when the plan says it ended (a preempted request keeps it: its draws and counts go on where they
stopped). Nothing here is rebuilt from the request's whole context per step: the repetition penalty
reads a [vocab] mask of the tokens seen so far, the presence and frequency penalties a [vocab] count of
the tokens generated so far, both updated one token at a time; a logit bias is a [vocab] row made once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llguidance import LLMatcher

from modelserve.engine.grammar import Grammars
from modelserve.engine.request import SamplingParams
from modelserve.engine.sampler import SamplingRow
from modelserve.engine.step_plan import NewRow


@dataclass
class RowState:
    params: SamplingParams
    generator: torch.Generator
    seen: torch.Tensor | None  # bool [vocab], for rows with a repetition penalty
    counts: torch.Tensor | None  # float [vocab]: each token's generated count, for presence/frequency penalties
    bias: torch.Tensor | None  # float [vocab], for rows with a logit bias
    matcher: LLMatcher | None = None  # structured output: where the row is in its grammar
    generated: int = 0


class SamplingStates:
    """Row state by request key, on `device`, for a vocabulary of `vocab` tokens."""

    def __init__(
        self, device: torch.device, vocab: int, eos_token_ids: frozenset[int], grammars: Grammars | None = None
    ) -> None:
        self._device = device
        self._vocab = vocab
        self._eos = eos_token_ids
        self._grammars = grammars
        self._rows: dict[int, RowState] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: NewRow) -> None:
        params = row.params
        seen = counts = bias = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self._vocab, dtype=torch.bool, device=self._device)
            ids = [t for t in row.prompt_ids if 0 <= t < self._vocab]
            if ids:
                seen[torch.tensor(ids, device=self._device)] = True
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros(self._vocab, dtype=torch.float32, device=self._device)
        if params.logit_bias:
            bias = torch.zeros(self._vocab, dtype=torch.float32, device=self._device)
            biased, values = zip(*params.logit_bias, strict=True)
            bias[torch.tensor(biased, device=self._device)] = torch.tensor(values, device=self._device)
        generator = torch.Generator().manual_seed(params.seed)
        matcher = None
        if params.grammar:  # admitted only once its grammar was built (EngineCore)
            assert self._grammars is not None
            matcher = self._grammars.matcher(params.grammar)
        self._rows[row.key] = RowState(params, generator, seen, counts, bias, matcher)

    def remove(self, key: int) -> None:
        self._rows.pop(key, None)

    def rows(self, keys: list[int]) -> list[SamplingRow]:
        """The sampler's view of these rows now (EOS and stop tokens are held back before min_new_tokens)."""
        out = []
        for key in keys:
            state = self._rows[key]
            params = state.params
            suppress: frozenset[int] = frozenset()
            # Before min_new_tokens, unless the row's grammar is complete (it allows nothing but EOS then).
            if state.generated < params.min_new_tokens and not (
                state.matcher is not None and state.matcher.is_stopped()
            ):
                suppress = params.stop_token_ids | (frozenset() if params.ignore_eos else self._eos)
            row = SamplingRow(params, state.generator, state.seen, suppress, state.counts, state.bias, state.matcher)
            out.append(row)
        return out

    def record(self, keys: list[int], token_ids: list[int]) -> None:
        """Each row sampled its token (in `keys`' order)."""
        for key, token in zip(keys, token_ids, strict=True):
            state = self._rows[key]
            state.generated += 1
            if state.seen is not None:
                state.seen[token] = True
            if state.counts is not None:
                state.counts[token] += 1
            if state.matcher is not None:
                state.matcher.consume_token(token)
