"""Prefix caching: requests that share a prompt's start reuse its keys and values, and greedy output stays
exactly what transformers' generate() and the engine without the cache produce; the cache stays within
its budget (LRU) and says what it saved, in the engine and in Usage over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from tokenizers import Tokenizer

from modelserve.cli import config_from_args, parse_args
from modelserve.config import KV_BLOCK_TOKENS as BLOCK_TOKENS
from modelserve.engine.block_manager import BlockManager, BlockTable
from modelserve.engine.core import EngineCore
from modelserve.engine.engine import Engine, EngineConfig
from modelserve.engine.protocol import AddRequest
from modelserve.engine.request import StreamEvent
from modelserve.models.loader import LoadedModel
from tests.conftest import ServerProcess, start_server
from tests.test_engine import _collect, _greedy, _load, _reference, _running

SYSTEM = "You are a careful assistant. Answer briefly, and say when you do not know. " * 6


def _ids(model: LoadedModel, text: str, n: int) -> list[int]:
    ids = model.encode(text)
    assert len(ids) >= n, f"{len(ids)} tokens"
    return ids[:n]


async def _run(engine: Engine, i: int, prompt: list[int], n: int) -> tuple[list[int], StreamEvent]:
    ids, _, last = await _collect(engine.submit(_greedy(i, prompt, n)))
    return ids, last


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
async def test_shared_prefix_greedy_matches_generate_and_caching_off(arch: str, model_dirs: dict[str, Path]) -> None:
    """Alone, then joining a running batch; prompts of 3 blocks and a bit, exactly 2 blocks, under a block."""
    model = _load(model_dirs[arch])
    prefix = _ids(model, SYSTEM, 3 * BLOCK_TOKENS)
    questions = [model.encode(q) for q in (" What is two and two?", " Name a colour.", " Why?", " Say hi.")]
    assert all(len(prefix) + len(q) < 4 * BLOCK_TOKENS for q in questions)  # all share exactly 3 full blocks
    # A multiple of the block size: its last block is cached, but never reused by the same prompt (the last
    # token is always computed, for its logits).
    exact = _ids(model, "The quick brown fox jumps over the lazy dog. " * 10, 2 * BLOCK_TOKENS)
    short = prefix[:10]  # under a block: nothing to cache
    prompts = [prefix + questions[0], prefix + questions[1], exact, exact, short, prefix + questions[2]]
    joining = [prefix + questions[3], prefix + questions[0]]
    n = 12

    async def serve(engine: Engine) -> tuple[list[list[int]], list[int]]:
        outputs, cached = [], []
        for i, prompt in enumerate(prompts):  # one at a time: each finds what the ones before left
            ids, last = await _run(engine, i, prompt, n)
            outputs.append(ids)
            cached.append(last.cached_tokens)
        # A long request runs; the shared-prefix ones join it mid-flight.
        running = engine.submit(_greedy(10, model.encode("Once upon a time"), 40))
        first = await running.__anext__()
        results = await asyncio.gather(*(_run(engine, 11 + j, p, n) for j, p in enumerate(joining)))
        outputs += [ids for ids, _ in results]
        cached += [last.cached_tokens for _, last in results]
        rest, _, _ = await _collect(running)
        assert len(first.token_ids) + len(rest) == 40
        return outputs, cached

    async with _running(model, 8) as engine:
        assert engine.core.prefix_caching
        cached_outputs, cached = await serve(engine)
        stats = engine.stats()
    async with _running(model, 8, prefix_caching=False) as engine:
        assert not engine.core.prefix_caching
        plain_outputs, plain_cached = await serve(engine)

    for i, prompt in enumerate(prompts + joining):
        expected = _reference(model, prompt, n)
        assert cached_outputs[i] == expected, f"{arch} prompt {i} with the cache diverged from generate()"
        assert plain_outputs[i] == expected, f"{arch} prompt {i} without the cache diverged from generate()"
    three_blocks = 3 * BLOCK_TOKENS
    assert cached == [0, three_blocks, 0, BLOCK_TOKENS, 0, three_blocks, three_blocks, three_blocks]
    assert plain_cached == [0] * len(cached)
    assert stats.prefix_cache_hit_tokens == sum(cached)
    assert 0 < stats.prefix_cache_tokens <= stats.prefix_cache_budget_tokens


PREFIX = [(7 * i) % 300 + 5 for i in range(1000)]  # 1,000 tokens two prompts start with


def _core(model_dirs: dict[str, Path]) -> tuple[LoadedModel, EngineCore]:
    """The tiny Llama and an engine core to step by hand."""
    model = _load(model_dirs["llama"])
    core = EngineConfig(max_batch_size=4, kv_cache_bytes=8 << 20).build_core(
        model.model, model.eos_token_ids, model.max_sequence_length, observed=False
    )
    return model, core


def test_a_prefix_hit_shares_the_blocks_it_finds(model_dirs: dict[str, Path]) -> None:
    """A second prompt with a running one's 1,000-token prefix points its block table at the same blocks
    (their reference count goes to 2): nothing is copied, and its first token equals generate()'s."""
    model, core = _core(model_dirs)
    first, second = [*PREFIX, 11, 12], [*PREFIX, 13]
    core.apply(AddRequest(1, _greedy(1, first, 50)))
    while core.scheduler.prefilling or core.scheduler.waiting:
        core.step()
    used = core.blocks.used_blocks
    core.apply(AddRequest(2, _greedy(2, second, 3)))
    out = core.step()
    a, b = (next(s for s in core.scheduler.running if s.key == key) for key in (1, 2))
    shared = 1000 // BLOCK_TOKENS
    assert b.cached_tokens == shared * BLOCK_TOKENS
    assert a.table.blocks[:shared] == b.table.blocks[:shared]
    assert all(core.blocks.blocks[i].refs == 2 for i in b.table.blocks[:shared])
    assert core.blocks.used_blocks == used + len(b.table.blocks) - shared  # only its own last block is new
    token = next(row.token_id for row in out.rows if row.key == 2)
    assert token == _reference(model, second, 1)[0]


def test_prompts_sent_together_compute_their_common_prefix_once(model_dirs: dict[str, Path]) -> None:
    """Two prompts with one 1,000-token start arrive in the same step (n samples of a prompt, a shared system
    prompt): the second waits while the first computes the common blocks, then shares them, and its first
    token is still generate()'s."""
    model, core = _core(model_dirs)
    first, second = [*PREFIX, 11, 12], [*PREFIX, 13]
    core.apply(AddRequest(1, _greedy(1, first, 5)))
    core.apply(AddRequest(2, _greedy(2, second, 3)))
    tokens: dict[int, int] = {}
    while 2 not in tokens:
        for row in core.step().rows:
            tokens.setdefault(row.key, row.token_id)
    a, b = (next(s for s in core.scheduler.running if s.key == key) for key in (1, 2))
    shared = 1000 // BLOCK_TOKENS
    assert b.cached_tokens == shared * BLOCK_TOKENS  # computed once, by the first
    assert a.table.blocks[:shared] == b.table.blocks[:shared]
    assert all(core.blocks.blocks[i].refs == 2 for i in b.table.blocks[:shared])
    assert tokens[1] == _reference(model, first, 1)[0] and tokens[2] == _reference(model, second, 1)[0]


def test_blocks_are_cached_until_reused_least_recently_freed_first() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4)

    def run(tokens: list[int]) -> BlockTable:
        """A sequence that computed `tokens` and ended: its full blocks are cached, its blocks free."""
        table = BlockTable()
        shared = blocks.match_prefix(tokens)
        blocks.allocate(table, len(tokens), shared)
        blocks.commit(table, tokens, len(tokens))
        blocks.free(table)
        return table

    a, b, c = list(range(100, 109)), list(range(200, 209)), list(range(300, 309))  # 2 full blocks + 1 each
    run(a)
    run(b)
    assert blocks.used_blocks == 0 and blocks.cached_blocks() == 4
    assert len(blocks.match_prefix(a)) == 2 and len(blocks.match_prefix(a[:5])) == 1
    # A shorter prompt whose second block differs shares only the first; the same second block after a
    # different first block is not a match.
    assert len(blocks.match_prefix([*a[:4], *b[4:8], 1])) == 1
    assert blocks.match_prefix([*b[:4], *a[4:8], 1]) == blocks.match_prefix(b[:5])
    run(c)  # takes the blocks freed longest ago: a's (its partial block, then its last full one, ...)
    assert len(blocks.match_prefix(c)) == 2 and len(blocks.match_prefix(b)) == 2
    assert len(blocks.match_prefix(a)) < 2
    assert blocks.hit_tokens == 0  # matching alone takes nothing


def test_a_colliding_key_never_hands_over_another_prompts_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key collides here: a lookup still compares the tokens, so only the real owner matches."""
    from modelserve.engine import block_manager

    monkeypatch.setattr(block_manager, "block_key", lambda parent, tokens: 42)
    blocks = BlockManager(num_blocks=4, block_size=4)
    table = BlockTable()
    blocks.allocate(table, 5)
    blocks.commit(table, [1, 2, 3, 4, 5], 5)
    assert blocks.match_prefix([9, 9, 9, 9, 9]) == []
    assert blocks.match_prefix([1, 2, 3, 4, 5]) == table.blocks[:1]


def test_prefix_caching_is_a_flag_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(parse_args(["serve"])).prefix_caching is True
    assert config_from_args(parse_args(["serve", "--no-prefix-caching"])).prefix_caching is False
    monkeypatch.setenv("MODELSERVE_PREFIX_CACHING", "off")
    assert config_from_args(parse_args(["serve"])).prefix_caching is False


# ---- over gRPC --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny Llama with 8,192 tokens of KV: room for its 2,048-token context and a prefix cache beside it."""
    server = start_server(
        tmp_path_factory.mktemp("prefix-server"),
        *("--model", str(model_dirs["llama"]), "--max-batch-size", "4", "--grace-s", "1"),
        *("--kv-cache-bytes", str(8192 * 512)),
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


def test_a_repeated_long_prompt_reports_cached_tokens_in_usage(
    cached_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    prompt = SYSTEM + "What is the capital of France?"
    n_prompt = len(Tokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json")).encode(prompt).ids)
    assert n_prompt > 2 * BLOCK_TOKENS
    request = pb.GenerateRequest(prompt=prompt, params=pb.GenerationParameters(max_new_tokens=8, temperature=0.0))
    with cached_server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        runs: list[list[pb.GenerateResponse]] = []
        for _ in range(2):
            try:
                runs.append(list(stub.Generate(request, timeout=60)))
            except grpc.RpcError as exc:
                raise AssertionError(f"{exc}; log:\n{cached_server.log()}") from exc
    first, second = runs
    assert first[-1].usage.cached_tokens == 0
    assert second[0].usage.cached_tokens == 0  # sent before the prompt is looked at
    cached = second[-1].usage.cached_tokens
    assert 0 < cached < n_prompt and cached % BLOCK_TOKENS == 0
    assert second[-1].usage.input_tokens == n_prompt
    assert [t for m in first for t in m.token_ids] == [t for m in second for t in m.token_ids]
    assert cached_server.log_errors() == []
