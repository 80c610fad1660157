"""What a step feeds (engine/scheduler.py), read from its plan: each prompt's chunk, within the step's budget."""

from __future__ import annotations

from modelserve.engine.block_manager import BlockManager
from modelserve.engine.request import Request, SamplingParams
from modelserve.engine.scheduler import IDLE_PREFILL_FACTOR, Scheduler
from modelserve.engine.sequence import Sequence

BLOCK = 16


def _sequence(key: int, prompt: int) -> Sequence:
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    return Sequence(key, Request(str(key), tuple(range(1000 * key, 1000 * key + prompt)), params))  # no shared prefix


def _decoding(scheduler: Scheduler) -> Sequence:
    """One running row that decodes from the next step on."""
    seq = _sequence(1, 4)
    scheduler.add(seq)
    plan, _ = scheduler.schedule()
    scheduler.advance(plan)
    seq.tokens.append(7)  # its first token
    return seq


def test_prompts_that_arrive_together_are_prefilled_together_a_chunk_each_within_the_step_budget() -> None:
    scheduler = Scheduler(BlockManager(64, BLOCK), 8, prefill_chunk_tokens=16, max_num_batched_tokens=40)
    decoding = _decoding(scheduler)
    for key in (2, 3, 4):
        scheduler.add(_sequence(key, 30))
    plan, admitted = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16), (3, 16), (4, 7)]
    assert [seq.key for seq in admitted] == [2, 3, 4]
    scheduler.advance(plan)
    decoding.tokens.append(7)
    plan, _ = scheduler.schedule()  # the rest of each prompt, oldest first
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 14), (3, 14), (4, 11)]


def test_one_long_prompt_gets_its_chunk_a_step_beside_decoding_rows_and_more_when_none_decode() -> None:
    scheduler = Scheduler(BlockManager(64, BLOCK), 8, prefill_chunk_tokens=16, max_num_batched_tokens=2048)
    scheduler.add(_sequence(2, 500))
    plan, _ = scheduler.schedule()
    assert [len(row.token_ids) for row in plan.rows] == [16 * IDLE_PREFILL_FACTOR]  # nobody waits on this step
    scheduler = Scheduler(BlockManager(64, BLOCK), 8, prefill_chunk_tokens=16, max_num_batched_tokens=2048)
    decoding = _decoding(scheduler)
    scheduler.add(_sequence(2, 500))
    for _ in range(3):
        plan, _ = scheduler.schedule()
        assert [len(row.token_ids) for row in plan.rows] == [1, 16]
        scheduler.advance(plan)
        decoding.tokens.append(7)


def _scheduler(long_chunk: int, prefix_caching: bool = True) -> Scheduler:
    blocks = BlockManager(128, BLOCK)
    return Scheduler(blocks, 8, 16, 2048, prefix_caching=prefix_caching, long_prefill_chunk_tokens=long_chunk)


def test_prompts_over_four_chunks_get_the_long_chunk_each_while_rows_decode() -> None:
    scheduler = _scheduler(4)
    decoding = _decoding(scheduler)
    for key in (2, 3):
        scheduler.add(_sequence(key, 80))  # over four chunks: long
    short = _sequence(4, 64)  # four chunks: a chunk a step, like any prompt
    scheduler.add(short)
    plan, admitted = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4), (3, 4), (4, 16)]
    assert [seq.key for seq in admitted] == [2, 3, 4]
    scheduler.advance(plan)
    decoding.tokens.append(7)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4), (3, 4), (4, 16)]
    scheduler.advance(plan)
    for seq in (decoding, short):
        scheduler.remove(seq)  # no row decodes: every prompt gets the idle chunk
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(2, 72), (3, 72)]


def test_a_long_chunk_above_the_chunk_is_the_chunk() -> None:
    scheduler = _scheduler(64)
    _decoding(scheduler)
    scheduler.add(_sequence(2, 100))
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16)]


def test_a_prompt_is_long_by_what_it_has_to_compute_and_a_resuming_stream_never_is() -> None:
    scheduler = _scheduler(1)
    first = _sequence(2, 90)
    scheduler.add(first)
    plan, _ = scheduler.schedule()  # nothing decodes yet: all of it in one step, its full blocks cached
    scheduler.advance(plan)
    first.tokens.append(7)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    same_start = Sequence(3, Request("3", (*first.tokens[:80], 1, 2), params))  # 80 tokens from the cache
    scheduler.add(same_start)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(2, 1), (3, 2)]
    assert not same_start.long_prompt

    scheduler = _scheduler(1, prefix_caching=False)
    decoding = _decoding(scheduler)
    params = SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True)
    resumed = Sequence(2, Request("2", tuple(range(2000, 2010)), params))  # preempted after 60 tokens: it
    resumed.tokens += [7] * 60  # recomputes 70 beside a decoding row
    resumed.admitted = True
    scheduler.add(resumed)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16)]
    assert not resumed.long_prompt
    assert decoding.computed == 4


def test_a_long_prompt_whose_blocks_the_queue_waits_for_gets_the_whole_chunk() -> None:
    """The n samples of one prompt, or requests with one long system prompt: the second waits for the first's
    blocks (and the queue behind it waits too), so the first is no longer paced."""
    scheduler = _scheduler(4)
    decoding = _decoding(scheduler)
    first = _sequence(2, 100)
    scheduler.add(first)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4)]
    scheduler.advance(plan)
    decoding.tokens.append(7)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    scheduler.add(Sequence(3, Request("3", (*first.tokens, 5), params)))  # the same prompt and one token more
    plan, admitted = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4)] and not admitted
    scheduler.advance(plan)
    decoding.tokens.append(7)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16)]
