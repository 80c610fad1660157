"""Linear layers packed for oneDNN on a CPU (engine/cpu_linears.py): what is packed, what it computes, what it
costs in memory, and when nothing is packed. Greedy equality with generate() for every family, on both
forwards, is tests/test_families.py's, which runs with the packing on (tests/conftest.py packs even the tiny
models' small fp32 weights in-process; the servers the tests start keep them as loaded)."""

from __future__ import annotations

import copy
import gc
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from modelserve.engine import cpu_linears
from modelserve.engine.cpu_linears import Columns, Linears, PackedLinear
from modelserve.engine.gpt2_forward import GPT2Forward
from modelserve.engine.runner import ModelRunner
from modelserve.models.loader import load_model
from modelserve.models.quantize import quantize_model, weight_bytes

CPU = torch.device("cpu")


def _model(model_dirs: dict[str, Path], arch: str) -> PreTrainedModel:
    model: PreTrainedModel = load_model(str(model_dirs[arch]), CPU, torch.float32).model
    return model


def test_a_packed_linear_computes_what_f_linear_does_for_any_leading_shape() -> None:
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    layer = PackedLinear(weight, bias)
    for shape in ((1, 24), (7, 24), (2, 5, 24), (0, 24)):
        x = torch.randn(*shape, generator=generator)
        got = layer(x)
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert tuple(layer.weight.shape) == (40, 24)  # what the engine reads the LM head's vocabulary from


@pytest.mark.parametrize("name", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu"])
def test_a_gelu_runs_inside_the_packed_product(model_dirs: dict[str, Path], name: str) -> None:
    generator = torch.Generator().manual_seed(2)
    parent = nn.Module()
    parent.up = nn.Linear(24, 40)
    parent.act = ACT2FN[name]
    x = torch.randn(6, 24, generator=generator)
    with torch.inference_mode():
        expected = parent.act(parent.up(x))
        linears = Linears(_model(model_dirs, "gpt2"))  # packing is on for a transformers model
        projection = linears.activated(parent, "up", "act")
        assert type(parent.up) is PackedLinear and type(parent.act) is nn.Identity  # what generate() runs too
        assert projection is parent.up and linears.activations == 1
        torch.testing.assert_close(projection(x), expected, rtol=1e-4, atol=1e-5)


def test_an_activation_onednn_does_not_have_stays_a_call_of_its_own(model_dirs: dict[str, Path]) -> None:
    parent = nn.Module()
    parent.up = nn.Linear(24, 40)
    parent.act = nn.SiLU()
    x = torch.randn(6, 24)
    with torch.inference_mode():
        expected = parent.act(parent.up(x))
        linears = Linears(_model(model_dirs, "gpt2"))  # packing is on for a transformers model
        projection = linears.activated(parent, "up", "act")
        assert type(parent.up) is PackedLinear and type(parent.act) is nn.SiLU and linears.activations == 0
        torch.testing.assert_close(projection(x), expected, rtol=1e-4, atol=1e-5)


def test_gpt2_packs_every_linear_and_counts_its_tied_lm_head_as_a_copy(model_dirs: dict[str, Path]) -> None:
    model = _model(model_dirs, "gpt2")
    loaded_bytes = weight_bytes(model)
    head_bytes = model.get_output_embeddings().weight.numel() * 4
    runner = ModelRunner(model, frozenset(), 64)
    assert isinstance(runner.own, GPT2Forward)  # its products packed one by one, as its forward calls them
    kinds = {type(m).__name__ for m in model.modules()}
    assert "PackedLinear" in kinds and "Conv1D" not in kinds and "Linear" not in kinds
    mlp = model.transformer.h[0].mlp
    assert type(mlp.act) is nn.Identity and mlp.c_fc._post_op == "gelu"  # its GELU inside the first product
    assert runner.vocab_size == model.config.vocab_size
    # every other weight is freed once packed; the embeddings keep the tied head's original
    assert weight_bytes(model) == pytest.approx(loaded_bytes + head_bytes, rel=0.02)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_once_packed_no_view_of_the_weights_file_is_left(
    model_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    """Packing reads every float weight, so the file's pages become resident; were any view of the mapped
    safetensors file kept (the embeddings, a norm), they would stay so, doubling the weights' memory."""
    source = shutil.copytree(model_dirs[arch], tmp_path / arch)  # a file no other test has mapped
    weights_file = str((source / "model.safetensors").resolve())
    model = _model({arch: source}, arch)
    assert weights_file in Path("/proc/self/maps").read_text()  # as loaded: views into the mapped file
    runner = ModelRunner(model, frozenset(), 64)
    gc.collect()
    assert weights_file not in Path("/proc/self/maps").read_text()
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        assert model(ids).logits.shape[-1] == runner.vocab_size  # and the model still runs


def test_llama_fuses_then_packs_and_generate_still_runs(model_dirs: dict[str, Path]) -> None:
    model = _model(model_dirs, "llama")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before = model(ids).logits
    ModelRunner(model, frozenset(), 64)
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, n)) is Columns for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused
    assert type(attn.o_proj) is PackedLinear and type(model.model.layers[0].mlp.down_proj) is PackedLinear
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # a second engine on the same model multiplies by the same fused weight, once per layer
    again = ModelRunner(model, frozenset(), 64)
    assert again.own is not None
    assert again.own.layers[0].qkv is attn.q_proj.fused


def test_int8_models_are_not_packed(model_dirs: dict[str, Path]) -> None:
    model = copy.deepcopy(_model(model_dirs, "llama"))
    quantize_model(model, "int8")
    linears = Linears(model)
    assert not linears.packed and linears.reason is not None and "int8" in linears.reason


def test_a_dtype_onednn_cannot_pack_here_runs_as_loaded(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As bf16 does on a CPU without AVX512 or AVX-NE-CONVERT: oneDNN refuses the reorder."""

    def refuse(*args: object) -> torch.Tensor:
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    model = _model(model_dirs, "gpt2")
    linears = Linears(model)
    assert not linears.packed
    assert linears.reason is not None and "cannot pack float32" in linears.reason and "avx512bw" in linears.reason
    ModelRunner(model, frozenset(), 64)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert any(type(m).__name__ == "Conv1D" for m in model.modules())


def test_a_trial_product_that_differs_turns_packing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.ops.mkldnn._linear_pointwise

    def off_by_one(*args: object) -> torch.Tensor:
        result: torch.Tensor = real(*args) + 1
        return result

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", off_by_one)
    reason = cpu_linears._trial(torch.float32)
    assert reason is not None and "differed" in reason


def test_nothing_is_packed_off_the_cpu() -> None:
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    linears = Linears(model)
    assert not linears.packed and linears.reason is not None and "meta" in linears.reason


@pytest.mark.small_linears_as_loaded
def test_small_fp32_linears_stay_as_loaded_and_the_log_says_so(
    model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Under SMALL_FP32_WEIGHT elements oneDNN's fixed cost a call is more than MKL's whole product: the tiny
    GPT-2's nine linears (four a layer, and its LM head) all stay as loaded, and its forward is unchanged."""
    model = _model(model_dirs, "gpt2")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before = model(ids).logits
    with caplog.at_level(logging.INFO, logger=cpu_linears.__name__):
        runner = ModelRunner(model, frozenset(), 64)
    assert isinstance(runner.own, GPT2Forward)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert any("0 prepacked" in r.message and "9 fp32 ones as loaded" in r.message for r in caplog.records)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.small_linears_as_loaded
def test_fp32_weights_from_the_threshold_up_and_a_small_bf16_weight_are_packed(
    model_dirs: dict[str, Path],
) -> None:
    linears = Linears(_model(model_dirs, "gpt2"))  # packing is on for a transformers model
    rows = cpu_linears.SMALL_FP32_WEIGHT // 512
    parent = nn.Module()
    parent.at, parent.under = nn.Linear(512, rows), nn.Linear(512, rows - 1)
    parent.bf16 = nn.Linear(24, 40).to(torch.bfloat16)
    assert type(linears.module(parent, "at")) is PackedLinear
    assert type(linears.module(parent, "under")) is nn.Linear and linears.small == 1
    if cpu_linears._trial(torch.bfloat16) is None:  # oneDNN packs bf16 on this CPU
        assert type(linears.module(parent, "bf16")) is PackedLinear


@pytest.mark.small_linears_as_loaded
def test_a_llama_whose_fused_projections_stay_as_loaded_beside_a_packed_head_holds_each_weight_once(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the threshold at the tiny Llama's LM head, the head is packed and its fused q/k/v and gate/up stay
    as loaded: their modules' weights become views of the fused weight, and the copy out of the weights file
    that packing brings must leave them views, not copies of it. generate() computes what it did."""
    model = _model(model_dirs, "llama")
    monkeypatch.setattr(cpu_linears, "SMALL_FP32_WEIGHT", model.get_output_embeddings().weight.numel())
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before = model.generate(ids, max_new_tokens=8, do_sample=False)
    ModelRunner(model, frozenset(), 64)
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    layer = model.model.layers[0]
    storages = {
        group: {getattr(parent, name).weight.untyped_storage().data_ptr() for name in names}
        for group, parent, names in (
            ("qkv", layer.self_attn, ("q_proj", "k_proj", "v_proj")),
            ("gate_up", layer.mlp, ("gate_proj", "up_proj")),
        )
    }
    assert all(len(ptrs) == 1 for ptrs in storages.values())  # one fused weight each, held once
    assert type(layer.self_attn.o_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), before)
