"""Per-row logits processing and sampling, vectorised across the batch.

Each row keeps its own parameters and its own seeded generator, so a request
samples the same tokens whether it runs alone or beside others (peers' users
complain of one batch sampled with the first request's temperature).
Greedy rows take the argmax and stay exactly greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelserve.engine.request import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know of one row this step."""

    params: SamplingParams
    generator: torch.Generator  # on the CPU, seeded from params.seed
    seen_ids: Sequence[int]  # prompt and output so far, for the repetition penalty
    suppress_ids: frozenset[int]  # tokens that may not be chosen now (EOS before min_new_tokens)


@dataclass
class RowLogprobs:
    """Raw-model log-probabilities for one row's chosen token and its top alternatives."""

    chosen: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]
    chosen_logprobs: list[float]  # every row's token under the raw model distribution


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
    """Choose one token per row of `logits` ([rows, vocab])."""
    logits = raw_logits = logits.float()
    n_rows, vocab = logits.shape
    want_logprobs = any(r.params.logprobs for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.seen_ids]
    suppressed = [i for i, r in enumerate(rows) if r.suppress_ids]
    if penalised or suppressed:
        logits = logits.clone()
    if penalised:
        _apply_repetition_penalty(logits, penalised, rows)
    if suppressed:
        ids = _padded_ids(logits.device, [sorted(rows[i].suppress_ids) for i in suppressed])
        rows_index = torch.tensor(suppressed, device=logits.device)[:, None]
        logits[rows_index, ids] = float("-inf")

    chosen = torch.empty(n_rows, dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if greedy:
        chosen[greedy] = logits[greedy].argmax(dim=-1)
    if sampled:
        chosen[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled], vocab)

    token_ids = chosen.tolist()
    if raw_logprobs is not None:
        chosen_logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    else:  # one logsumexp per row is all it takes
        chosen_logprobs = (raw_logits.gather(1, chosen[:, None])[:, 0] - raw_logits.logsumexp(dim=-1)).tolist()
    out_logprobs: list[RowLogprobs | None] = [None] * n_rows
    if raw_logprobs is not None:
        for i, row in enumerate(rows):
            if row.params.logprobs:
                out_logprobs[i] = _row_logprobs(raw_logprobs[i], token_ids[i], row.params.top_logprobs)
    return SampleResult(token_ids, out_logprobs, chosen_logprobs)


def _padded_ids(device: torch.device, id_lists: list[list[int]]) -> torch.Tensor:
    """[rows, longest] ids; short rows repeat their first id, which reads and writes the same value."""
    width = max(len(ids) for ids in id_lists)
    return torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in id_lists], device=device)


def _apply_repetition_penalty(logits: torch.Tensor, row_ids: list[int], rows: Sequence[SamplingRow]) -> None:
    """CTRL's penalty (as transformers applies it) on every listed row at once, in place."""
    device = logits.device
    ids = _padded_ids(device, [sorted(set(rows[i].seen_ids)) for i in row_ids])
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in row_ids], device=device)[:, None]
    rows_index = torch.tensor(row_ids, device=device)[:, None]
    scores = logits[rows_index, ids]
    # A tiny penalty could push a logit to +inf, and softmax(+inf) is NaN: keep every logit finite.
    big = torch.finfo(logits.dtype).max
    logits[rows_index, ids] = torch.where(scores > 0, scores / penalty, scores * penalty).clamp(-big, big)


def _sample_rows(logits: torch.Tensor, rows: Sequence[SamplingRow], vocab: int) -> torch.Tensor:
    """Temperature, top-k and top-p per row, then one inverse-CDF draw per row."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device)
    # Shifted so the largest logit is 0 first: the same distribution, and a temperature near 0 (down to
    # float32 subnormals) sends the others to -inf, i.e. greedy, instead of overflowing to inf and NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None]
    # One uniform draw per row from the row's own generator keeps each row reproducible.
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device)
    needs_filter = any(r.params.top_k or r.params.top_p < 1.0 for r in rows)
    if needs_filter:
        logits, order = logits.sort(dim=-1, descending=True)
        top_k = torch.tensor([r.params.top_k or vocab for r in rows], device=device)
        ranks = torch.arange(vocab, device=device)
        logits = logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if needs_filter:
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    if needs_filter:
        picks = order.gather(1, picks)
    return picks[:, 0]


def _row_logprobs(row: torch.Tensor, token_id: int, top_n: int) -> RowLogprobs:
    top_ids: list[int] = []
    top_values: list[float] = []
    if top_n:
        values, ids = row.topk(top_n)
        top_ids, top_values = ids.tolist(), values.tolist()
    return RowLogprobs(float(row[token_id]), top_ids, top_values)
