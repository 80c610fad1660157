"""What a real model directory brings: sharded weights, generation_config.json's sampling defaults,
and the flags that shape what is served (--served-model-name, --revision, --max-model-len); and a
directory that lacks a piece fails with one line naming the directory and the missing file."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from modelserve.cli import config_from_args, parse_args
from modelserve.models import loader
from modelserve.models.loader import GenerationDefaults, load_model, load_model_info, resolve_dtype
from modelserve.models.random_init import build_random_model
from modelserve.models.source import ModelLoadError
from modelserve.server.core.validation import InvalidArgument, Limits, RequestDefaults, build_request, resolve_defaults
from modelserve.server.grpc.convert import parameters
from tests.conftest import ServerProcess, start_server

CPU = torch.device("cpu")
CONTEXT = 2048  # build_random_model's max_len
VOCAB = 1024


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama directory as save_pretrained writes it: one model.safetensors, no sampling defaults."""
    return build_random_model(tmp_path_factory.mktemp("model-dir") / "base", "llama", seed=7)


def _copy(base: Path, dest: Path, generation: dict[str, Any] | None = None) -> Path:
    shutil.copytree(base, dest)
    if generation is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation))
    return dest


def _one_line_error(source: Path) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model_info(str(source), CPU, torch.float32)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- sharded safetensors, and what a directory may lack -----------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights saved in shards of 100 KB, with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path_factory.mktemp("sharded") / "model"
    shutil.copytree(base_dir, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded, max_shard_size="100KB")
    return sharded


def test_sharded_safetensors_load_the_same_weights(base_dir: Path, sharded_dir: Path) -> None:
    shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (sharded_dir / "model.safetensors").exists()
    whole, split = load_model(str(base_dir), CPU, torch.float32), load_model(str(sharded_dir), CPU, torch.float32)
    ids = torch.tensor([whole.encode("The quick brown fox")])
    with torch.no_grad():
        assert torch.equal(whole.model(ids).logits, split.model(ids).logits)


def test_a_missing_shard_is_named_with_its_directory(sharded_dir: Path, tmp_path: Path) -> None:
    broken = _copy(sharded_dir, tmp_path / "broken")
    shards = sorted(broken.glob("model-*-of-*.safetensors"))
    shards[1].unlink()
    message = _one_line_error(broken)
    assert f"model directory {broken} is missing the weights shard {shards[1].name}" in message
    assert f"that model.safetensors.index.json lists (1 of {len(shards)} shards missing)" in message


def test_a_directory_without_weights_says_so(base_dir: Path, tmp_path: Path) -> None:
    empty = _copy(base_dir, tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    assert _one_line_error(empty).startswith(f"model directory {empty} has no weights: expected model.safetensors")


def test_a_directory_without_tokenizer_json_says_so(base_dir: Path, tmp_path: Path) -> None:
    no_tokenizer = _copy(base_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    assert _one_line_error(no_tokenizer).startswith(f"model directory {no_tokenizer} has no tokenizer.json")


# --- generation_config.json ---------------------------------------------------------------------


def test_a_tokenizer_json_that_truncates_or_pads_leaves_prompts_whole(base_dir: Path, tmp_path: Path) -> None:
    """Some tokenizer.json files switch truncation or padding on; served prompts are neither cut nor padded."""
    source = _copy(base_dir, tmp_path / "truncating")
    path = source / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<unk>",
    }
    path.write_text(json.dumps(spec))
    text = "the quick brown fox jumps over the lazy dog"
    whole = load_model_info(str(base_dir), CPU, torch.float32).encode(text)
    assert 4 < len(whole) < 64
    assert load_model_info(str(source), CPU, torch.float32).encode(text) == whole


def test_generation_config_sampling_defaults_and_eos_ids(base_dir: Path, tmp_path: Path) -> None:
    tuned = {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_new_tokens": 64,
        "min_p": 0.05,
        "eos_token_id": [0, 5],
    }
    info = load_model_info(str(_copy(base_dir, tmp_path / "tuned", tuned)), CPU, torch.float32)
    assert info.generation_defaults == GenerationDefaults(0.7, 0.8, 20, 1.05, 64, 0.05)
    assert info.eos_token_ids == (0, 5)
    # do_sample false means greedy, whatever temperature the file also names (transformers would not sample).
    greedy = _copy(base_dir, tmp_path / "greedy", {"do_sample": False, "temperature": 0.6, "max_new_tokens": 5})
    assert load_model_info(str(greedy), CPU, torch.float32).generation_defaults == GenerationDefaults(
        temperature=0.0, max_new_tokens=5
    )
    # save_pretrained's own file sets only token ids: no sampling defaults.
    assert load_model_info(str(base_dir), CPU, torch.float32).generation_defaults == GenerationDefaults()
    bare = _copy(base_dir, tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    assert load_model_info(str(bare), CPU, torch.float32).generation_defaults == GenerationDefaults()


def _limits(defaults: RequestDefaults) -> Limits:
    return Limits(
        vocab_size=VOCAB,
        max_sequence_length=512,
        defaults=defaults,
        max_max_new_tokens=511,
        max_prompt_bytes=1 << 20,
        max_stop_sequences=16,
        max_stop_sequence_chars=256,
        max_top_logprobs=20,
        max_prompt_tokens=511,
    )


def test_unset_parameters_take_the_models_defaults_and_set_ones_win() -> None:
    model = GenerationDefaults(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_new_tokens=64, min_p=0.05
    )
    defaults = resolve_defaults(model, default_max_new_tokens=0, max_max_new_tokens=511, vocab_size=VOCAB)
    assert defaults == RequestDefaults(64, 0.7, 0.8, 20, 1.05, 0.05, from_model=defaults.from_model)
    assert set(defaults.from_model) == {
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "min_p",
        "max_new_tokens",
    }

    unset = build_request("a", [1, 2, 3], parameters(pb.GenerationParameters()), _limits(defaults)).params
    assert (unset.max_new_tokens, unset.temperature, unset.top_p, unset.top_k) == (64, 0.7, 0.8, 20)
    assert (unset.repetition_penalty, unset.min_p) == (1.05, pytest.approx(0.05))
    explicit = pb.GenerationParameters(
        max_new_tokens=3, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, min_p=0.0
    )
    params = build_request("b", [1, 2, 3], parameters(explicit), _limits(defaults)).params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (3, 0.0, 1.0, 0)
    assert (params.repetition_penalty, params.min_p) == (1.0, 0.0)
    # The server's own limits still bind a request that asks for more than the model's default.
    with pytest.raises(InvalidArgument, match=r"params.max_new_tokens must be in \[1, 511\]"):
        build_request("c", [1], parameters(pb.GenerationParameters(max_new_tokens=600)), _limits(defaults))


def test_the_servers_limits_bind_the_models_defaults(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelserve.server.core.validation")
    too_long = GenerationDefaults(max_new_tokens=8192)
    capped = resolve_defaults(too_long, default_max_new_tokens=0, max_max_new_tokens=4096, vocab_size=VOCAB)
    assert capped.max_new_tokens == 4096 and capped.from_model == ("max_new_tokens",)
    assert "default max_new_tokens 8192 (the model's generation_config.json) is above" in caplog.text
    assert "requests that leave it unset get 4096" in caplog.text

    # An explicit --default-max-new-tokens wins over the model's.
    operator = resolve_defaults(too_long, default_max_new_tokens=32, max_max_new_tokens=4096, vocab_size=VOCAB)
    assert operator.max_new_tokens == 32 and operator.from_model == ()
    assert RequestDefaults().max_new_tokens == 256  # neither sets one

    caplog.clear()
    odd = GenerationDefaults(temperature=150.0, top_p=0.0, top_k=VOCAB + 1, repetition_penalty=1.1, max_new_tokens=0)
    kept = resolve_defaults(odd, default_max_new_tokens=0, max_max_new_tokens=4096, vocab_size=VOCAB)
    assert kept == RequestDefaults(repetition_penalty=1.1, from_model=("repetition_penalty",))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings
    assert "temperature must be in [0, 100] (0 = greedy), got 150; ignored" in warnings[0]


# --- --max-model-len, --revision, --served-model-name -----------------------------------------------


def test_max_model_len_caps_the_context_and_refuses_more(base_dir: Path) -> None:
    assert load_model_info(str(base_dir), CPU, torch.float32).max_sequence_length == CONTEXT
    assert load_model_info(str(base_dir), CPU, torch.float32, max_model_len=512).max_sequence_length == 512
    with pytest.raises(ModelLoadError, match=f"--max-model-len 4096 is above this model's context of {CONTEXT}"):
        load_model_info(str(base_dir), CPU, torch.float32, max_model_len=4096)
    with pytest.raises(ModelLoadError, match="--max-model-len -1: use 0"):
        load_model_info(str(base_dir), CPU, torch.float32, max_model_len=-1)
    # It travels to the engine core with the ModelInfo: the loaded model carries it.
    assert load_model(str(base_dir), CPU, torch.float32, max_model_len=512).max_sequence_length == 512


def test_revision_is_ignored_for_a_local_directory(base_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    info = load_model_info(str(base_dir), CPU, torch.float32, revision="v2", model_id="my-model")
    assert info.revision is None and info.model_id == "my-model"
    assert f"--revision v2 is ignored: {base_dir} is a local directory" in caplog.text


def test_the_new_flags_are_config_fields_and_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSERVE_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("MODELSERVE_SERVED_MODEL_NAME", "from-env")
    config = config_from_args(parse_args(["serve", "--revision", "abc123", "--served-model-name", "my-model"]))
    assert (config.served_model_name, config.revision, config.max_model_len) == ("my-model", "abc123", 1024)
    assert config.default_max_new_tokens == 0  # the model's, else 256


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned_server(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A server on a model whose generation_config.json asks for greedy and 5 new tokens."""
    model = _copy(base_dir, tmp_path_factory.mktemp("tuned") / "model", {"do_sample": False, "max_new_tokens": 5})
    args = ("--model", str(model), "--served-model-name", "my-model", "--max-model-len", "512")
    server = start_server(tmp_path_factory.mktemp("tuned-server"), *args)
    try:
        server.wait_serving()
        yield server, model
    finally:
        server.terminate()


def test_server_reports_and_applies_the_model_directorys_settings(tuned_server: tuple[ServerProcess, Path]) -> None:
    server, model = tuned_server
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
        assert (info.model_id, info.max_sequence_length, info.default_max_new_tokens) == ("my-model", 512, 5)
        assert info.max_max_new_tokens == 511
        defaults = info.generation_defaults
        assert (defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.top_k) == (5, 0.0, 1.0, 0)
        assert defaults.repetition_penalty == 1.0 and set(defaults.from_model) == {"temperature", "max_new_tokens"}
        assert stub.Health(pb.HealthRequest(), timeout=30).model_id == "my-model"

        request = pb.GenerateRequest(prompt="The quick brown fox")  # no params at all
        runs = [list(stub.Generate(request, timeout=60)) for _ in range(2)]
        outputs = [[t for message in run for t in message.token_ids] for run in runs]
        assert [run[-1].finish_reason for run in runs] == [pb.FINISH_REASON_LENGTH] * 2
        assert len(outputs[0]) == 5 and outputs[0] == outputs[1]  # the server picks a new seed each time
        assert runs[0][-1].seed != runs[1][-1].seed

        loaded = load_model(str(model), CPU, torch.float32)
        prompt = torch.tensor([loaded.encode("The quick brown fox")])
        reference = loaded.model.generate(prompt, do_sample=False, max_new_tokens=5)[0, prompt.shape[1] :]
        assert outputs[0] == reference.tolist()

        too_long = pb.GenerateRequest(prompt="word " * 600)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(too_long, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 511" in str(err.value.details())  # the context less one token to generate
    assert "--max-model-len 512: sequences hold at most that many tokens" in server.log()
    assert not server.log_errors()


@pytest.mark.parametrize("native", [False, True], ids=["avx2", "amx"])
def test_dtype_auto_on_a_cpu_and_a_warning_for_bf16_without_native_support(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loader, "cpu_computes_bf16", lambda: native)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
        assert resolve_dtype("float32", cpu) == torch.float32
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "slow path" in warnings[0] and "float32" in warnings[0]
