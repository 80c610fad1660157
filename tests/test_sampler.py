"""Per-row sampling: each row its own parameters and generator; greedy exact."""

from __future__ import annotations

import math

import torch

from modelserve.engine.request import SamplingParams
from modelserve.engine.sampler import SamplingRow, argmax, sample
from modelserve.engine.sampling_state import SamplingStates
from modelserve.engine.step_plan import NewRow


def _row(seed: int = 0, **kw: object) -> SamplingRow:
    params = SamplingParams(max_new_tokens=8, seed=seed, **kw)  # type: ignore[arg-type]
    return SamplingRow(params, torch.Generator().manual_seed(seed), None, frozenset())


def _seen(vocab: int, ids: tuple[int, ...]) -> torch.Tensor:
    """A row's [vocab] mask of the tokens it has seen, as the runner keeps it."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    rows = [_row(temperature=0.0), _row(1, temperature=1.5), _row(temperature=0.0), _row(2, temperature=0.7)]
    result = sample(logits, rows)
    assert result.token_ids[0] == int(logits[0].argmax())
    assert result.token_ids[2] == int(logits[2].argmax())


def test_a_row_samples_the_same_alone_or_in_a_batch() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.9, top_k=50, top_p=0.9)
    alone = [sample(logits[1:2], [_row(42, **kw)]).token_ids[0] for _ in range(1)]
    rows = [_row(1, temperature=2.0), _row(42, **kw), _row(3, temperature=0.0)]
    assert sample(logits, rows).token_ids[1] == alone[0]


def test_same_seed_same_sequence_of_draws() -> None:
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(3))
    a, b = _row(9, temperature=1.0), _row(9, temperature=1.0)
    assert [sample(logits, [a]).token_ids[0] for _ in range(20)] == [
        sample(logits, [b]).token_ids[0] for _ in range(20)
    ]


def test_top_k_one_is_greedy_and_top_p_keeps_the_head() -> None:
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(4))
    best = int(logits[0].argmax())
    assert {sample(logits, [_row(s, top_k=1)]).token_ids[0] for s in range(20)} == {best}
    assert {sample(logits, [_row(s, top_p=1e-6)]).token_ids[0] for s in range(20)} == {best}


def test_top_k_limits_choices_to_the_k_most_likely() -> None:
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(5))
    allowed = set(logits[0].topk(3).indices.tolist())
    picks = {sample(logits, [_row(s, temperature=5.0, top_k=3)]).token_ids[0] for s in range(60)}
    assert picks <= allowed and len(picks) > 1


def test_suppressed_tokens_are_never_chosen_and_penalty_applies() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3] = 10.0
    row = SamplingRow(SamplingParams(max_new_tokens=4, temperature=0.0), torch.Generator(), None, frozenset({3}))
    assert sample(logits, [row]).token_ids[0] != 3
    logits[0, 4] = 9.0
    penalised = SamplingRow(
        SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=2.0),
        torch.Generator(),
        _seen(10, (3,)),
        frozenset(),
    )
    assert sample(logits, [penalised]).token_ids[0] == 4  # 10/2 < 9


def test_logprobs_are_raw_model_logprobs_with_top_alternatives() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(6))
    row = _row(temperature=0.0, logprobs=True, top_logprobs=3)
    result = sample(logits, [row])
    lp = result.logprobs[0]
    assert lp is not None
    expected = torch.log_softmax(logits[0], -1)
    assert abs(lp.chosen - float(expected.max())) < 1e-6
    assert lp.top_ids == expected.topk(3).indices.tolist()


def test_penalty_and_suppression_are_per_row_in_a_mixed_batch() -> None:
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(7))
    seen = tuple(logits[0].topk(5).indices.tolist())

    def row(penalty: float, suppress: frozenset[int] = frozenset()) -> SamplingRow:
        params = SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=penalty)
        return SamplingRow(params, torch.Generator(), _seen(200, seen), suppress)

    alone = [sample(logits[i : i + 1], [r]).token_ids[0] for i, r in enumerate([row(3.0), row(1.0), row(1.0)])]
    batch = sample(logits, [row(3.0), row(1.0), row(1.0, frozenset({int(logits[2].argmax())}))]).token_ids
    assert batch[0] == alone[0] and batch[0] not in seen[:1]  # the penalised row moved off its best token
    assert batch[1] == int(logits[1].argmax())  # an unpenalised row beside it is untouched
    assert batch[2] != int(logits[2].argmax())  # its suppressed best token was not chosen


def _states(vocab: int, *params: SamplingParams) -> tuple[SamplingStates, list[int]]:
    """Sampling states as the runner keeps them, a row per params (keys 0, 1, ...)."""
    states = SamplingStates(torch.device("cpu"), vocab, frozenset())
    for key, p in enumerate(params):
        states.add(NewRow(key, p, (0, 1)))
    return states, list(range(len(params)))


def test_logit_bias_of_100_makes_every_token_that_token_greedy_or_sampled() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(8))
    states, keys = _states(
        300,
        SamplingParams(max_new_tokens=8, temperature=0.0, logit_bias=((17, 100.0),)),
        SamplingParams(
            max_new_tokens=8, temperature=1.5, seed=3, logit_bias=((17, 100.0), (int(logits[1].argmax()), -100.0))
        ),
    )
    for _ in range(10):
        result = sample(logits, states.rows(keys))
        assert result.token_ids == [17, 17]
        states.record(keys, result.token_ids)


def test_a_bias_of_minus_100_bans_the_best_token_and_leaves_others_untouched() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(9))
    best = int(logits[0].argmax())
    states, keys = _states(
        300,
        SamplingParams(max_new_tokens=8, temperature=0.0, logit_bias=((best, -100.0),)),
        SamplingParams(max_new_tokens=8, temperature=0.0),
    )
    chosen = sample(logits, states.rows(keys)).token_ids
    assert chosen[0] == int(logits[0].topk(2).indices[1])
    assert chosen[1] == int(logits[1].argmax())


def test_presence_and_frequency_penalties_follow_openais_formula_over_generated_tokens() -> None:
    """logit - frequency x count - presence x (count > 0), counted from the row's own output only."""
    vocab = 50
    logits = torch.zeros(1, vocab)
    logits[0, :5] = torch.tensor([5.0, 4.9137, 4.8311, 4.7423, 4.6519])  # gaps that no penalty sum ties
    params = SamplingParams(max_new_tokens=20, temperature=0.0, presence_penalty=0.15, frequency_penalty=0.1)
    states, keys = _states(vocab, params)  # the prompt (0, 1) does not count
    produced = []
    counts = torch.zeros(vocab)
    for _ in range(12):
        expected = int((logits[0] - 0.1 * counts - 0.15 * (counts > 0)).argmax())
        token = sample(logits, states.rows(keys)).token_ids[0]
        assert token == expected
        produced.append(token)
        counts[token] += 1
        states.record(keys, [token])
    assert produced[0] == 0 and len(set(produced)) == 5  # penalised away from the best, round the five


def test_a_negative_presence_penalty_favours_what_was_generated() -> None:
    logits = torch.zeros(1, 100)
    logits[0, 0], logits[0, 5] = 1.0, -0.5
    states, keys = _states(100, SamplingParams(max_new_tokens=8, temperature=0.0, presence_penalty=-2.0))
    assert sample(logits, states.rows(keys)).token_ids == [0]
    states.record(keys, [5])  # as if it had drawn 5: now -0.5 + 2 beats 1.0
    assert sample(logits, states.rows(keys)).token_ids == [5]


def test_min_p_keeps_only_tokens_near_the_likeliest() -> None:
    logits = torch.full((1, 100), -5.0)
    logits[0, 7], logits[0, 8], logits[0, 9] = 2.0, 2.0 + math.log(0.5), 2.0 + math.log(0.05)
    picks = {sample(logits, [_row(s, temperature=1.0, min_p=0.1)]).token_ids[0] for s in range(200)}
    assert picks == {7, 8}  # 9 is at 0.05 of the likeliest, under 0.1; the rest far under
    assert len({sample(logits, [_row(s, temperature=1.0)]).token_ids[0] for s in range(200)}) > 3


def test_penalty_state_survives_as_the_row_goes_on_and_costs_no_context_rebuild() -> None:
    """The counts are persistent: a row's state after n tokens holds their counts, made one token at a time."""
    states, keys = _states(20, SamplingParams(max_new_tokens=50, temperature=0.0, frequency_penalty=1.0))
    for token in [3, 3, 4]:
        states.record(keys, [token])
    (row,) = states.rows(keys)
    assert row.counts is not None and row.counts[3] == 2 and row.counts[4] == 1 and float(row.counts.sum()) == 3


def test_the_chunked_argmax_is_torchs_argmax_ties_nan_and_inf_included() -> None:
    generator = torch.Generator().manual_seed(3)
    for vocab in (5, 64, 100, 128, 1000, 50257):
        logits = torch.randn(9, vocab, generator=generator)
        logits[1] = float("-inf")  # every token suppressed
        logits[2, :] = 1.0  # all tied: the first wins
        logits[3, vocab // 2] = logits[3, vocab - 1] = 50.0  # a tie across chunks, the tail's last
        logits[4, vocab - 1] = 50.0  # the maximum in the columns past the last whole chunk
        logits[5, vocab - 1] = float("nan")  # NaN counts as the largest, in the tail
        logits[6, vocab // 3] = float("nan")  # and before it
        logits[7, 0] = float("inf")
        logits = logits.repeat(-(-(1 << 14) // logits.numel()), 1)  # enough for the chunks (small ones: torch's)
        assert torch.equal(argmax(logits), logits.argmax(dim=-1)), vocab
        assert torch.equal(argmax(logits[::2]), logits[::2].argmax(dim=-1)), vocab  # rows not contiguous
