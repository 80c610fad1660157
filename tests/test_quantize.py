"""INT8 weight-only quantisation (models/quantize.py): the layers it makes, what they compute, the memory
they save, the greedy output they keep, the flag's validation, and a real server started with it.

The agreement bounds come from measuring these tests' own prompts on the tiny seeded models (6 prompts x
32 greedy tokens, the fp32 model as reference): the int8 model's greedy choice along the reference's own
continuation agreed at 97.4% (gpt2) and 96.9% (llama) of positions, where a plain bf16 copy of the same
models agreed at 97.9% and 97.9%; the two greedy generations shared a leading run of 21.3 and 23.5
tokens on average (bf16: 18.0 and 26.7). Random weights make near-ties common, so once a token differs
the rest usually does too; the bounds below leave a wide margin under those figures.
"""

from __future__ import annotations

import copy
import gc
import shutil
import statistics
import weakref
from pathlib import Path

import pytest
import torch
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from modelserve.cli import parse_args
from modelserve.engine.engine import Engine, EngineConfig
from modelserve.models.loader import load_model, load_model_info, load_weights
from modelserve.models.quantize import Int8WeightOnlyLinear, QuantizationError, quantize_model, weight_bytes
from tests.conftest import start_server

CPU = torch.device("cpu")
PROMPTS = ("Hello", "The quick brown fox", "日本語のテキストも", "def generate(prompt):", "Numbers: 0 1 2", "Emoji 🙂")
NEW_TOKENS = 32
MIN_TOP1_AGREEMENT = 0.90  # measured 0.974 (gpt2), 0.969 (llama)
MIN_MEAN_COMMON_PREFIX = 8  # tokens; measured 21.3 (gpt2), 23.5 (llama)


def _float_model(model_dirs: dict[str, Path], arch: str) -> PreTrainedModel:
    model: PreTrainedModel = load_model(str(model_dirs[arch]), CPU, torch.float32).model
    return model


def _quantised(model: PreTrainedModel) -> PreTrainedModel:
    copied = copy.deepcopy(model)
    quantize_model(copied, "int8")
    return copied


def _greedy_choices(model: PreTrainedModel, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The model's greedy token after each prefix of prompt + continuation[:-1] (teacher forcing)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + continuation[:-1]])).logits[0, len(prompt) - 1 :]
    return torch.argmax(logits, -1)


def _linear_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every linear layer's weight in nn.Linear's [out, in] layout (Conv1D's transposed), but the LM head's."""
    head = model.get_output_embeddings()
    return {
        name: (module.weight.T if isinstance(module, Conv1D) else module.weight).detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head
    }


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_linear_layers_become_int8_with_a_scale_per_output_row(model_dirs: dict[str, Path], arch: str) -> None:
    model = _float_model(model_dirs, arch)
    weights = _linear_weights(model)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    quantize_model(model, "int8")
    modules = dict(model.named_modules())
    assert weights and all(isinstance(modules[name], Int8WeightOnlyLinear) for name in weights)
    for name, weight in weights.items():
        layer = modules[name]
        assert isinstance(layer, Int8WeightOnlyLinear)
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == weight.shape
        assert layer.scales.shape == (weight.shape[0],) and layer.scales.is_floating_point()
        scales = layer.scales.float()[:, None]
        # Each weight is its nearest multiple of its row's scale (half a step off at most).
        assert ((layer.weight.float() * scales - weight).abs() <= 0.51 * scales).all(), name
    # The LM head and the embeddings are left as they were.
    assert model.get_output_embeddings() is head and head.weight.dtype == torch.float32
    assert model.get_input_embeddings() is embeddings and embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("layer", [nn.Linear(64, 48), Conv1D(48, 64)], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "case",
    [
        "float32",
        "non-contiguous",
        # A bf16 model's input starting 16 bytes into its storage: the CPU kernel's aligned loads fault on it.
        "unaligned bfloat16",
    ],
)
def test_a_quantised_layer_computes_what_the_float_layer_does(layer: nn.Linear | Conv1D, case: str) -> None:
    torch.manual_seed(0)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    model = nn.Sequential(layer)
    x = {
        "float32": torch.randn(2, 3, 64),
        "non-contiguous": torch.randn(2, 3, 80)[..., 8:72],
        "unaligned bfloat16": torch.randn(2 * 3 * 64 + 8).to(torch.bfloat16)[8:].view(2, 3, 64),
    }[case]
    quantised = copy.deepcopy(model).to(x.dtype)
    quantize_model(quantised, "int8")
    assert isinstance(quantised[0], Int8WeightOnlyLinear)
    with torch.inference_mode():
        expected = model(x.float())
        got = quantised(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    error = (got.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.02, f"relative error {error:.4f}"


def test_a_layer_whose_input_width_is_not_a_multiple_of_16_stays_float() -> None:
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 8))
    quantize_model(model, "int8")
    assert type(model[0]) is nn.Linear and isinstance(model[1], Int8WeightOnlyLinear)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_linear_weight_memory_drops_about_4x(model_dirs: dict[str, Path], arch: str) -> None:
    model = _float_model(model_dirs, arch)
    names = set(_linear_weights(model))
    modules = dict(model.named_modules())
    before, total_before = sum(weight_bytes(modules[n]) for n in names), weight_bytes(model)
    quantize_model(model, "int8")
    modules = dict(model.named_modules())
    after = sum(weight_bytes(modules[n]) for n in names)
    # int8 weights plus a bf16 scale per row (and GPT-2's float32 biases) on 64-wide layers.
    assert 3.5 < before / after <= 4.0, (before, after)
    assert weight_bytes(model) == total_before - (before - after)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_float_linear_weight_outlives_quantisation(model_dirs: dict[str, Path], arch: str) -> None:
    """Not the model, nor transformers (tied weights, hooks), nor the quantiser keeps a replaced layer alive."""
    model = _float_model(model_dirs, arch)
    head = model.get_output_embeddings()
    replaced = [m for m in model.modules() if isinstance(m, nn.Linear | Conv1D) and m is not head]
    originals = [weakref.ref(t) for m in replaced for t in (m, m.weight, m.bias) if t is not None]
    del replaced
    quantize_model(model, "int8")
    gc.collect()
    assert originals and [ref() for ref in originals if ref() is not None] == []
    # Nor does a tensor it holds keep a larger storage alive: the storages it reaches are weight_bytes.
    tensors = (*model.parameters(), *model.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == weight_bytes(model)


def _maps(path: Path) -> bool:
    """Whether this process has `path` mapped into its memory."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    return str(path.resolve()) in maps.read_text()


def test_an_int8_model_holds_no_view_of_its_float_weights_file(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """from_pretrained's float weights are views into the mapped safetensors file, whose pages the int8
    layers read: were any view kept (the embeddings), those pages would stay resident for good."""
    source = shutil.copytree(model_dirs["gpt2"], tmp_path / "gpt2")  # a file no other test has mapped
    info = load_model_info(str(source), CPU, torch.float32)
    loaded = load_weights(info)
    assert _maps(source / "model.safetensors")  # as loaded, unquantised: the file is mapped
    float_bytes = loaded.weight_bytes
    assert float_bytes == weight_bytes(loaded.model)
    del loaded
    gc.collect()
    assert not _maps(source / "model.safetensors")
    loaded = load_weights(info, quantization="int8")
    gc.collect()
    assert not _maps(source / "model.safetensors")
    assert loaded.weight_bytes == weight_bytes(loaded.model) < float_bytes
    model = loaded.model  # GPT-2's LM head is still its token embedding: copied out once, not twice
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The in-process engine reports what the engine-core process sends in CoreReady.
    engine = Engine(loaded.model, loaded.tokenizer, (), EngineConfig(kv_cache_bytes=1 << 20), 64)
    assert engine.weight_bytes == loaded.weight_bytes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_output_agrees_with_the_float_model(model_dirs: dict[str, Path], arch: str) -> None:
    model = _float_model(model_dirs, arch)
    quantised = _quantised(model)
    tokenizer = Tokenizer.from_file(str(model_dirs[arch] / "tokenizer.json"))
    prefixes, agree, total = [], 0, 0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1] :]
            got = quantised.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1] :]
        differ = (expected != got).nonzero()
        prefixes.append(int(differ[0]) if len(differ) else NEW_TOKENS)
        # Both models' greedy choice at every position of the float model's own continuation.
        along = ids[0].tolist(), expected.tolist()
        agree += int((_greedy_choices(model, *along) == _greedy_choices(quantised, *along)).sum())
        total += NEW_TOKENS
    assert agree / total >= MIN_TOP1_AGREEMENT, f"top-1 agreement {agree}/{total}"
    assert statistics.mean(prefixes) >= MIN_MEAN_COMMON_PREFIX, f"common prefixes {prefixes}"


def test_an_unknown_quantization_is_refused(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(QuantizationError, match="--quantization int4: expected one of none, int8"):
        quantize_model(nn.Sequential(nn.Linear(16, 16)), "int4")
    assert parse_args(["serve", "--quantization", "int8"]).quantization == "int8"
    assert parse_args(["serve"]).quantization == "none"
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve", "--quantization", "int4"])
    assert exited.value.code == 2
    assert "--quantization / MODELSERVE_QUANTIZATION 'int4': use one of none, int8" in capsys.readouterr().err
    monkeypatch.setenv("MODELSERVE_QUANTIZATION", "fp8")
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve"])
    assert exited.value.code == 2
    assert "MODELSERVE_QUANTIZATION 'fp8': use one of none, int8" in capsys.readouterr().err


def test_a_server_started_with_int8_streams_and_describes_its_model(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """GPT-2 (its Conv1D layers) through the engine-core process: the flag reaches the loader there."""
    server = start_server(tmp_path, "--model", str(model_dirs["gpt2"]), "--quantization", "int8", "--grace-s", "5")
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            params = pb.GenerationParameters(max_new_tokens=16, temperature=0.0, ignore_eos=True)
            messages = list(stub.Generate(pb.GenerateRequest(prompt="Hello there", params=params), timeout=60))
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
            health = stub.Health(pb.HealthRequest(), timeout=10)
        served = [t for m in messages for t in m.token_ids]
        assert len(served) == 16 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert info.architecture == "GPT2LMHeadModel" and info.model_type == "gpt2" and info.vocab_size > 0
        assert info.device == "cpu" and info.dtype == "float32"
        assert "--quantization int8: 8 linear layers hold int8 weights" in server.log()
    finally:
        assert server.terminate() == 0
    assert server.log_errors() == []
    # The weights' bytes as the engine core counted them: the quantised model's, below the float model's.
    float_model = _float_model(model_dirs, "gpt2")
    quantised = _quantised(float_model)
    assert info.HasField("weight_bytes") and health.HasField("weight_bytes")
    assert info.weight_bytes == health.weight_bytes == weight_bytes(quantised) < weight_bytes(float_model)
    # The served tokens are the quantised model's greedy choices. Compared along the served tokens rather
    # than as a whole generation: the engine's batched attention and a full forward differ in the last
    # bits, which the bfloat16 activations can turn into a flipped near-tie, and every later token with it.
    tokenizer = Tokenizer.from_file(str(model_dirs["gpt2"] / "tokenizer.json"))
    choices = _greedy_choices(quantised, tokenizer.encode("Hello there").ids, served).tolist()
    assert sum(a == b for a, b in zip(choices, served, strict=True)) >= 15, (choices, served)
