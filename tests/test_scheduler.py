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


def test_prompts_over_two_chunks_share_the_long_allowance_oldest_first_while_rows_decode() -> None:
    scheduler = Scheduler(
        BlockManager(128, BLOCK), 8, prefill_chunk_tokens=16, max_num_batched_tokens=2048, long_prefill_chunk_tokens=4
    )
    decoding = _decoding(scheduler)
    scheduler.add(_sequence(2, 33))  # over two chunks: long
    scheduler.add(_sequence(3, 33))
    plan, admitted = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4)]
    assert [seq.key for seq in admitted] == [2]  # the next long prompt waits for the allowance: nothing overtakes it
    scheduler.advance(plan)
    decoding.tokens.append(7)
    scheduler.add(_sequence(4, 32))  # two chunks: fed a chunk a step like any prompt, once the long one is admitted
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 4)]
    scheduler.remove(decoding)  # no row decodes: every prompt gets the idle chunk
    plan, admitted = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(2, 29), (3, 33), (4, 32)]
    assert [seq.key for seq in admitted] == [3, 4]


def test_a_long_allowance_of_several_chunks_feeds_several_long_prompts_a_chunk_each() -> None:
    scheduler = Scheduler(
        BlockManager(128, BLOCK), 8, prefill_chunk_tokens=16, max_num_batched_tokens=2048, long_prefill_chunk_tokens=64
    )
    decoding = _decoding(scheduler)
    for key in (2, 3, 4):
        scheduler.add(_sequence(key, 100))
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16), (3, 16), (4, 16)]
    scheduler.advance(plan)
    decoding.tokens.append(7)
    plan, _ = scheduler.schedule()
    assert [(row.key, len(row.token_ids)) for row in plan.rows] == [(1, 1), (2, 16), (3, 16), (4, 16)]
