"""The real server over real gRPC: streaming, batch, validation, stop sequences,
greedy equality with transformers, tokenize and model info."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
import torch
from modelserve_client.v1 import generation_pb2 as pb
from tokenizers import Tokenizer

from tests.conftest import ServerProcess


def _stream(stub: object, prompt: str, **params: object) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt=prompt, params=pb.GenerationParameters(**params))  # type: ignore[arg-type]
    return list(stub.Generate(request, timeout=60))  # type: ignore[attr-defined]


def _tokenizer(model_dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json"))


def test_stream_shape_first_deltas_last(stub: object, model_dirs: dict[str, Path]) -> None:
    messages = _stream(
        stub, "Hello there", max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    first, *middle, last = messages
    tokenizer = _tokenizer(model_dirs)
    n_prompt = len(tokenizer.encode("Hello there").ids)
    assert first.request_id and first.usage.input_tokens == n_prompt and not first.token_ids and not first.text
    assert all(m.request_id == first.request_id for m in messages)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in [first, *middle])
    ids = [t for m in messages for t in m.token_ids]
    assert len(ids) == 12
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.output_tokens == 12 and last.usage.input_tokens == n_prompt
    assert 0 <= last.timings.queue_seconds <= last.timings.time_to_first_token_seconds <= last.timings.total_seconds
    assert last.seed == 3
    assert "".join(m.text for m in messages) == tokenizer.decode(ids, skip_special_tokens=True)
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert [lp.chosen.token_id for lp in logprobs] == ids
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.chosen.logprob - 1e-5 for lp in logprobs)


def test_greedy_over_grpc_equals_transformers_generate(stub: object, model_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    tokenizer = _tokenizer(model_dirs)
    for prompt in ("Hello", "The quick brown fox", "日本語のテキストも"):
        ids = tokenizer.encode(prompt).ids
        expected = model.generate(
            torch.tensor([ids]),
            max_new_tokens=20,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()
        got = [t for m in _stream(stub, prompt, max_new_tokens=20, temperature=0.0) for t in m.token_ids]
        assert got == expected


def test_prompt_logprobs_equal_a_transformers_forward(stub: object, model_dirs: dict[str, Path]) -> None:
    """On the first message with tokens, one entry per prompt token from the second on, and in a batch item."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = _tokenizer(model_dirs).encode(prompt).ids
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    messages = _stream(stub, prompt, max_new_tokens=3, temperature=0.0, prompt_logprobs=2)
    with_tokens = [m for m in messages if m.token_ids]
    scored = with_tokens[0].prompt_logprobs
    assert all(not m.prompt_logprobs for m in messages if m is not with_tokens[0])
    assert [lp.chosen.token_id for lp in scored] == ids[1:]
    for p, lp in enumerate(scored):
        row = expected[p]
        assert lp.chosen.logprob == pytest.approx(float(row[ids[p + 1]]), abs=1e-4)
        assert lp.chosen.rank == int((row > row[ids[p + 1]]).sum()) + 1
        assert [t.token_id for t in lp.top] == row.topk(2).indices.tolist() and [t.rank for t in lp.top] == [1, 2]
    batch = stub.BatchGenerate(  # type: ignore[attr-defined]
        pb.BatchGenerateRequest(
            requests=[
                pb.GenerateRequest(prompt=prompt, params=pb.GenerationParameters(max_new_tokens=1, prompt_logprobs=0))
            ]
        ),
        timeout=60,
    )
    item = batch.items[0].result.prompt_logprobs
    assert [lp.chosen.logprob for lp in item] == pytest.approx([lp.chosen.logprob for lp in scored], abs=1e-5)


def test_same_seed_same_output_and_utf8_round_trip(stub: object) -> None:
    def run() -> list[pb.GenerateResponse]:
        return _stream(stub, "絵文字 🙂 and 中文", max_new_tokens=48, temperature=1.0, seed=99, ignore_eos=True)

    a, b = run(), run()
    # The same tokens; how they are split into messages depends on how fast the caller reads (deltas merge).
    assert [t for m in a for t in m.token_ids] == [t for m in b for t in m.token_ids]
    text = "".join(m.text for m in a)
    assert text == "".join(m.text for m in b)
    # Every delta is whole, valid UTF-8 (protobuf strings would refuse anything else).
    assert all(m.text.encode("utf-8").decode("utf-8") == m.text for m in a)


def test_tokenize_round_trips_multibyte_text(stub: object) -> None:
    text = "日本語のテキスト 🙂🚀 naïve"
    response = stub.Tokenize(pb.TokenizeRequest(text=text, return_tokens=True))  # type: ignore[attr-defined]
    assert response.token_count == len(response.token_ids) == len(response.tokens) > len(text.split())
    assert "".join(response.tokens).encode() != b""  # single-token pieces may be partial characters


def test_stop_sequence_spanning_tokens_is_never_streamed(stub: object, model_dirs: dict[str, Path]) -> None:
    params = dict(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    free = _stream(stub, "The quick brown fox", **params)
    tokenizer = _tokenizer(model_dirs)
    pieces = [tokenizer.decode([t]) for m in free for t in m.token_ids]
    full = "".join(m.text for m in free)
    # A stop sequence made of the end of one token and the start of the next.
    stop = None
    offset = 0
    for left, right in itertools.pairwise(pieces):
        offset += len(left)
        if len(left) >= 2 and len(right) >= 2 and "\ufffd" not in left + right and offset > 4:
            stop = left[-2:] + right[:2]
            if full.find(stop) == offset - 2:
                break
            stop = None
    assert stop is not None, f"no usable token boundary in {pieces!r}"
    stopped = _stream(stub, "The quick brown fox", stop=[stop], **params)
    texts = [m.text for m in stopped]
    assert "".join(texts) == full[: full.find(stop)]
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    included = _stream(stub, "The quick brown fox", stop=[stop], include_stop_sequence=True, **params)
    assert "".join(m.text for m in included) == full[: full.find(stop) + len(stop)]


def test_stop_token_ids_and_min_new_tokens(stub: object) -> None:
    free = [t for m in _stream(stub, "Hello", max_new_tokens=10, temperature=0.0, ignore_eos=True) for t in m.token_ids]
    stop_at = free[3]
    first_hit = free.index(stop_at)
    stopped = _stream(stub, "Hello", max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_at])
    assert [t for m in stopped for t in m.token_ids] == free[: first_hit + 1]
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP_TOKEN


def test_batch_with_mixed_parameters_keeps_order_and_isolates_errors(stub: object) -> None:
    greedy = pb.GenerationParameters(max_new_tokens=8, temperature=0.0)
    requests = [
        pb.GenerateRequest(prompt="Hello", params=greedy, request_id="a"),
        pb.GenerateRequest(
            prompt="Hello", params=pb.GenerationParameters(max_new_tokens=5, temperature=1.2, seed=4, ignore_eos=True)
        ),
        pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(temperature=-1.0)),
        pb.GenerateRequest(
            prompt="The quick brown fox jumps", params=pb.GenerationParameters(max_new_tokens=3, top_k=5, seed=1)
        ),
    ]
    response = stub.BatchGenerate(pb.BatchGenerateRequest(requests=requests), timeout=60)  # type: ignore[attr-defined]
    items = response.items
    assert [i.WhichOneof("outcome") for i in items] == ["result", "result", "error", "result"]
    assert items[0].result.request_id == "a"
    streamed = _stream(stub, "Hello", max_new_tokens=8, temperature=0.0)
    assert list(items[0].result.token_ids) == [t for m in streamed for t in m.token_ids]
    assert len(items[1].result.token_ids) == 5 and items[1].result.finish_reason == pb.FINISH_REASON_LENGTH
    assert items[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "requests[2].params.temperature" in items[2].error.message
    assert items[3].result.usage.output_tokens == len(items[3].result.token_ids) <= 3


INVALID = [
    ({"max_new_tokens": 0}, "params.max_new_tokens"),
    ({"max_new_tokens": 10**6}, "params.max_new_tokens"),
    ({"max_new_tokens": 5, "min_new_tokens": 6}, "params.min_new_tokens"),
    ({"min_new_tokens": -1}, "params.min_new_tokens"),
    ({"temperature": -0.1}, "params.temperature"),
    ({"temperature": float("nan")}, "params.temperature"),
    ({"temperature": 1000.0}, "params.temperature"),
    ({"top_p": 0.0}, "params.top_p"),
    ({"top_p": 1.5}, "params.top_p"),
    ({"top_k": -1}, "params.top_k"),
    ({"top_k": 10**7}, "params.top_k"),
    ({"repetition_penalty": 0.0}, "params.repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "params.repetition_penalty"),
    ({"stop": [""]}, "params.stop[0]"),
    ({"stop": ["x" * 300]}, "params.stop[0]"),
    ({"stop": ["s"] * 17}, "params.stop"),
    ({"stop_token_ids": [-1]}, "params.stop_token_ids[0]"),
    ({"stop_token_ids": [10**7]}, "params.stop_token_ids[0]"),
    ({"top_logprobs": 3}, "params.top_logprobs needs params.logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "params.top_logprobs"),
    ({"prompt_logprobs": -1}, "params.prompt_logprobs"),
    ({"prompt_logprobs": 21}, "params.prompt_logprobs"),
    ({"truncate_input_tokens": -1}, "params.truncate_input_tokens"),
    ({"truncate_input_tokens": 10**7}, "params.truncate_input_tokens"),
]


@pytest.mark.parametrize(("params", "named"), INVALID, ids=[n for _, n in INVALID])
def test_every_invalid_parameter_is_invalid_argument_naming_the_field(
    stub: object, params: dict[str, object], named: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _stream(stub, "Hello", **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = err.value.details()  # type: ignore[attr-defined]
    assert named in details and ("must be" in details or "at most" in details or "needs" in details), details


def test_prompt_limits_and_truncation(stub: object) -> None:
    for request, named in [
        (pb.GenerateRequest(prompt=""), "prompt is empty"),
        (pb.GenerateRequest(prompt="x" * ((1 << 20) + 1)), "prompt is"),
        (pb.GenerateRequest(prompt="word " * 3000), "truncate_input_tokens"),
        (pb.GenerateRequest(prompt="Hello", request_id="r" * 200), "request_id"),
        (
            pb.GenerateRequest(prompt="word " * 300, params=pb.GenerationParameters(max_new_tokens=1400)),
            "may be at most",
        ),
        # Fits the model's context but never the KV budget: rejected up front, not queued forever.
        (
            pb.GenerateRequest(prompt="word " * 600, params=pb.GenerationParameters(max_new_tokens=1000)),
            "a sequence holds 1504",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))  # type: ignore[attr-defined]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, named  # type: ignore[attr-defined]
        assert named in err.value.details()  # type: ignore[attr-defined]
    truncated = _stream(stub, "word " * 3000, max_new_tokens=2, truncate_input_tokens=100)
    assert truncated[0].usage.input_tokens == 100 and truncated[-1].usage.output_tokens <= 2


def test_model_info_and_detailed_health(stub: object, llama_server: ServerProcess, model_dirs: dict[str, Path]) -> None:
    from modelserve.models.loader import load_model
    from modelserve.models.quantize import weight_bytes

    info = stub.ModelInfo(pb.ModelInfoRequest())  # type: ignore[attr-defined]
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.vocab_size > 0 and list(info.eos_token_ids)
    assert info.max_sequence_length == 1504  # the KV budget, tighter than the 2,048-token context
    assert info.max_max_new_tokens <= info.max_sequence_length - 1 and info.default_max_new_tokens > 0
    assert info.device == "cpu" and info.dtype == "float32" and not info.is_demo
    health = stub.Health(pb.HealthRequest())  # type: ignore[attr-defined]
    assert health.state == pb.SERVER_STATE_SERVING and health.model_loaded
    assert health.memory.process_rss_bytes > 0 and health.uptime_seconds > 0 and health.server_version
    assert health.requests_running >= 0 and health.requests_waiting >= 0
    # The weights' bytes as the engine core counted them: the float32 model's parameters and buffers.
    expected = weight_bytes(load_model(str(model_dirs["llama"]), torch.device("cpu"), torch.float32).model)
    assert info.HasField("weight_bytes") and info.weight_bytes == health.weight_bytes == expected


def test_reflection_lists_the_services(llama_server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with llama_server.channel() as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"modelserve.v1.GenerationService", "grpc.health.v1.Health"} <= services


def test_n_samples_interleave_with_their_index_and_share_the_prompt(stub: object, llama_server: ServerProcess) -> None:
    """params.n = 3 on modelserve.v1: each sample's messages keep a stream's order (first: input tokens; last:
    finish reason), tagged by index; sample j is what a lone request with seed + j gives; samples 1 and 2
    found the prompt's blocks cached by sample 0."""
    prompt = "Samples over modelserve.v1 share their prompt: " + " ".join(f"s{i}" for i in range(40))
    params = dict(max_new_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    messages = _stream(stub, prompt, n=3, **params)
    by_index = {j: [m for m in messages if m.index == j] for j in range(3)}
    assert sum(len(ms) for ms in by_index.values()) == len(messages)
    for j, ms in by_index.items():
        assert ms[0].usage.input_tokens > 0 and not ms[0].text
        assert ms[-1].finish_reason == pb.FINISH_REASON_LENGTH and ms[-1].seed == 5 + j
        alone = _stream(stub, prompt, **{**params, "seed": 5 + j})
        assert [t for m in ms for t in m.token_ids] == [t for m in alone for t in m.token_ids]
    assert by_index[1][-1].usage.cached_tokens > 0 and by_index[2][-1].usage.cached_tokens > 0

    with pytest.raises(grpc.RpcError) as err:
        _stream(stub, prompt, n=100000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.n must be in [0, " in err.value.details()
    batch = pb.BatchGenerateRequest(requests=[pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(n=2))])
    (item,) = stub.BatchGenerate(batch, timeout=60).items  # type: ignore[attr-defined]
    assert item.WhichOneof("outcome") == "error" and "requests[0].params.n is 2" in item.error.message
