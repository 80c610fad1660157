"""Prefix caching: requests that share a prompt's start reuse its keys and values, and greedy output stays
exactly what transformers' generate() and the engine without the cache produce; the cache stays within
its budget (LRU) and says what it saved, in the engine and in Usage over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from tokenizers import Tokenizer

from modelserve.cli import config_from_args, parse_args
from modelserve.engine.engine import Engine
from modelserve.engine.kv_cache import KVShape, PrefillBuffer
from modelserve.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, prefix_budget_tokens
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
    prefix = _ids(model, SYSTEM, 3 * BLOCK_TOKENS + 5)
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
        assert engine.core.prefix is not None
        cached_outputs, cached = await serve(engine)
        stats = engine.stats()
    async with _running(model, 8, prefix_caching=False) as engine:
        assert engine.core.prefix is None
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


async def test_the_cache_stays_within_its_budget_and_evicts_the_least_recently_used(
    model_dirs: dict[str, Path],
) -> None:
    model = _load(model_dirs["llama"])
    async with _running(model, 4) as probe:
        per_token, context = probe.core.runner.kv_shape.bytes_per_token, model.max_sequence_length
    # Room for one full-context sequence and 8 blocks beside it: the cache gets those 8 blocks.
    budget = context + 8 * BLOCK_TOKENS
    assert prefix_budget_tokens(budget, context) == 8 * BLOCK_TOKENS
    async with _running(model, 4, kv_cache_bytes=budget * per_token) as engine:
        assert engine.max_sequence_tokens == context  # the cache never shortens what can be served
        words = SYSTEM.split()
        prompts = [_ids(model, " ".join(words[i:] + words[:i]), 2 * BLOCK_TOKENS + 3) for i in range(12)]
        assert len({tuple(p[:BLOCK_TOKENS]) for p in prompts}) == len(prompts)  # no two share a block
        for i, prompt in enumerate(prompts):
            _, last = await _run(engine, i, prompt, 2)
            assert last.cached_tokens == 0
            stats = engine.stats()
            assert stats.prefix_cache_tokens == min(2 * (i + 1), 8) * BLOCK_TOKENS <= stats.prefix_cache_budget_tokens
        # The last four prompts are cached; the first ones were evicted.
        ids, last = await _run(engine, 20, prompts[-1], 4)
        assert last.cached_tokens == 2 * BLOCK_TOKENS and ids == _reference(model, prompts[-1], 4)
        _, last = await _run(engine, 21, prompts[0], 2)
        assert last.cached_tokens == 0
        assert engine.stats().prefix_cache_tokens == 8 * BLOCK_TOKENS


def _filled_buffer(shape: KVShape, prompt: list[int]) -> PrefillBuffer:
    """A completed prefill whose every value is its token id, layer and K/V: a copy shows where it came from."""
    buffer = PrefillBuffer(shape, len(prompt))
    for layer in range(shape.n_layers):
        for kind, tensors in enumerate((buffer.keys, buffer.values)):
            ids = torch.tensor(prompt, dtype=shape.dtype)
            tensors[layer][0] = (ids + 0.5 * layer + 0.25 * kind)[None, :, None]
    buffer.past = len(prompt)
    return buffer


def test_restore_copies_exact_blocks_and_evicts_leaves_first() -> None:
    shape = KVShape(n_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    cache = PrefixCache(shape, 4 * BLOCK_TOKENS + 7)
    assert cache.budget_tokens == 4 * BLOCK_TOKENS  # whole blocks

    def prompt(start: int, n_blocks: int, extra: int = 1) -> list[int]:
        return list(range(start, start + n_blocks * BLOCK_TOKENS + extra))

    def restored(tokens: list[int]) -> int:
        buffer = PrefillBuffer(shape, len(tokens))
        n = cache.restore(tokens, buffer)
        reference = _filled_buffer(shape, tokens)
        for layer in range(shape.n_layers):
            assert torch.equal(buffer.keys[layer][:, :, :n], reference.keys[layer][:, :, :n])
            assert torch.equal(buffer.values[layer][:, :, :n], reference.values[layer][:, :, :n])
        assert buffer.past == n
        return n

    a, b, c = prompt(1000, 2), prompt(2000, 2), prompt(3000, 2)
    cache.insert(a, _filled_buffer(shape, a))
    cache.insert(b, _filled_buffer(shape, b))
    assert cache.tokens_held() == 4 * BLOCK_TOKENS
    assert restored(a) == 2 * BLOCK_TOKENS  # a is now the most recent, b the least
    assert restored(a[: BLOCK_TOKENS + 1]) == BLOCK_TOKENS  # a shorter prompt with the same start
    cache.insert(c, _filled_buffer(shape, c))  # evicts b's two blocks, its second (a leaf) first
    assert cache.tokens_held() == 4 * BLOCK_TOKENS
    assert restored(b) == 0 and restored(a) == 2 * BLOCK_TOKENS and restored(c) == 2 * BLOCK_TOKENS
    # The same second block after a different first block is a different block.
    assert restored(c[:BLOCK_TOKENS] + a[BLOCK_TOKENS:]) == BLOCK_TOKENS
    # A prompt longer than the whole cache keeps only what fits.
    long = prompt(5000, 6, extra=0)
    cache.insert(long, _filled_buffer(shape, long))
    assert cache.tokens_held() == 4 * BLOCK_TOKENS and restored(long) == 4 * BLOCK_TOKENS
    assert restored(a) == 0
    assert cache.hit_tokens == 12 * BLOCK_TOKENS


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
