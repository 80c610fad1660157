"""Model families: greedy decoding equals transformers' generate() token for token, on tiny random
configs of each family, alone and joining a running batch. The sliding-window configs use a window
of 16 tokens, well below prompt plus output, so every row decodes past its window while rows of
other lengths share its steps (the case a shared window position gets wrong)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from modelserve.engine.engine import EngineConfig
from modelserve.engine.llama_forward import OWN_FORWARD_TYPES
from modelserve.engine.self_check import SelfCheckError, check_greedy_matches_generate
from modelserve.models.capability import FAMILIES
from modelserve.models.loader import load_model_info
from modelserve.models.random_init import build_random_model
from modelserve.models.source import ModelLoadError
from tests.test_engine import DEVICE, _collect, _greedy, _load, _reference, _running

WINDOW = 16
_MIXED = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW, "head_dim": 16}

# name -> (model type, config overrides)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-sliding": ("mistral", {"sliding_window": WINDOW}),
    "gemma2": ("gemma2", _MIXED),
    "gemma3": ("gemma3_text", _MIXED),
    "phi": ("phi", {}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "stablelm": ("stablelm", {}),
    "gpt_neox": ("gpt_neox", {}),
    "starcoder2": ("starcoder2", {"sliding_window": None}),
    "smollm3": ("smollm3", {"pad_token_id": 0}),
    "falcon": ("falcon", {}),
}


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _model_dir(root: Path, name: str) -> Path:
    model_type, overrides = CONFIGS[name]
    path = root / name
    if not (path / "config.json").exists():
        build_random_model(path, model_type, seed=3, config_overrides=overrides)
    return path


def test_every_family_named_as_tested_is_tested() -> None:
    assert {model_type for model_type, _ in CONFIGS.values()} == set(FAMILIES)


# The families our own forwards run (engine/llama_forward.py, engine/gpt2_forward.py): checked on transformers'
# forward too.
OWN_FORWARD = sorted(name for name, (model_type, _) in CONFIGS.items() if model_type in OWN_FORWARD_TYPES | {"gpt2"})


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_greedy_matches_generate(name: str, family_root: Path) -> None:
    await _check_family(name, family_root, own_forward=True)


@pytest.mark.parametrize("name", OWN_FORWARD)
async def test_greedy_matches_generate_on_the_transformers_forward(name: str, family_root: Path) -> None:
    await _check_family(name, family_root, own_forward=False)


async def _check_family(name: str, family_root: Path, own_forward: bool) -> None:
    model = _load(_model_dir(family_root, name))
    prompts = [[(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate((12, 3, 21, 7))]
    lengths = [30, 26, 22, 34]  # prompt + output > WINDOW for every row
    async with _running(model, 8, own_forward=own_forward) as engine:
        assert (engine.core.runner.own is not None) == (own_forward and name in OWN_FORWARD)
        first = engine.submit(_greedy(0, prompts[0], lengths[0]))
        head: list[int] = []
        while len(head) < 5:  # it runs alone for a few steps; the others join it mid-flight
            head.extend((await first.__anext__()).token_ids)
        others = [engine.submit(_greedy(i, prompts[i], lengths[i])) for i in range(1, len(prompts))]
        results = await asyncio.gather(_collect(first), *(_collect(s) for s in others))
    outputs = [head + results[0][0], *(ids for ids, _, _ in results[1:])]
    for i, ids in enumerate(outputs):
        assert ids == _reference(model, prompts[i], lengths[i]), f"{name}: request {i} diverged from generate()"


@pytest.mark.parametrize(
    ("model_type", "overrides", "says"),
    [
        ("t5", {}, "encoder-decoder"),
        ("mamba", {}, "state-space"),
        (
            "qwen3_next",
            {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
            "linear_attention",
        ),
    ],
)
def test_what_cannot_run_is_refused_at_start_up_saying_why(
    model_type: str, overrides: dict[str, Any], says: str, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **overrides).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # refused on its config, before the weights are read
    with pytest.raises(ModelLoadError, match=says):
        load_model_info(str(tmp_path), DEVICE, torch.float32)


async def test_an_untested_family_passes_the_start_up_self_check(family_root: Path) -> None:
    """Cohere is not among FAMILIES: a server would run this check before serving it."""
    assert "cohere" not in FAMILIES
    path = family_root / "cohere"
    build_random_model(path, "cohere", seed=3)
    model = _load(path)
    core = EngineConfig(max_batch_size=4, kv_cache_bytes=64 << 20).build_core(
        model.model, model.eos_token_ids, model.max_sequence_length, observed=False
    )
    assert check_greedy_matches_generate(core, model.architecture) > 0
    assert not core.has_work() and core.blocks.used_blocks == 0


def test_a_model_the_engine_decodes_wrongly_is_refused(family_root: Path) -> None:
    model = _load(_model_dir(family_root, "llama"))
    core = EngineConfig(max_batch_size=4, kv_cache_bytes=64 << 20).build_core(
        model.model, model.eos_token_ids, model.max_sequence_length, observed=False
    )
    forward = core.runner.forward
    core.runner.forward = lambda *args: forward(*args).flip(0)  # type: ignore[method-assign]  # rows swapped
    with pytest.raises(SelfCheckError, match="differ from transformers' generate"):
        check_greedy_matches_generate(core, model.architecture)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_a_served_model_answers_past_its_window_as_generate_does(
    name: str, family_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Through the real server (engine core process, gRPC): concurrent greedy streams of 40 tokens, longer
    than Gemma 3's 16-token window, each equal to generate()."""
    from concurrent.futures import ThreadPoolExecutor

    from modelserve_client.v1 import generation_pb2 as pb
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    from tests.conftest import start_server

    path = _model_dir(family_root, name)
    model = _load(path)
    prompts = ["the quick brown fox", "hello", "a b c d e f g h i j k l"]
    server = start_server(tmp_path_factory.mktemp(f"{name}-server"), "--model", str(path))
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def generate(prompt: str) -> list[int]:
                params = pb.GenerationParameters(max_new_tokens=40, min_new_tokens=40, temperature=0.0)
                request = pb.GenerateRequest(prompt=prompt, params=params)
                return [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]

            with ThreadPoolExecutor(len(prompts)) as pool:
                served = list(pool.map(generate, prompts))
    finally:
        server.terminate()
    for prompt, ids in zip(prompts, served, strict=True):
        assert len(ids) == 40
        assert ids == _reference(model, model.encode(prompt), 40, min_new_tokens=40), f"{name}: {prompt!r} diverged"
