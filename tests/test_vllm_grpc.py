"""vLLM's VllmEngine service (server/grpc/vllm.py) on the real server, through smg-grpc-proto's stubs (the
contract the smg router is built from): streams, token-id input, abort, model/server/load info, the
tokenizer bundle, a cache flush, health, refusals by field name; and modelserve.v1 on the same port giving
the same tokens."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from bench.harness import start_server, wait_idle, wait_until
from modelserve.server.core.unserved import OPENAI_SERVED, UNSERVED
from tests.conftest import LONG, ServerProcess

VLLM_SERVICE = "vllm.grpc.engine.VllmEngine"
TIMEOUT_S = 60.0
PROMPT = "The quick brown fox"
UNIMPLEMENTED, INVALID = grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture()
def channel(llama_server: ServerProcess) -> Iterator[grpc.Channel]:
    with llama_server.channel() as channel:
        yield channel


@pytest.fixture()
def vllm(channel: grpc.Channel) -> Any:
    return vpb_grpc.VllmEngineStub(channel)


def _generate(vllm: Any, stream: bool = True, **fields: Any) -> list[Any]:
    """One Generate's messages; `fields` are GenerateRequest's, sampling_params given as a dict."""
    sampling = vpb.SamplingParams(**fields.pop("sampling_params", {}))
    request = vpb.GenerateRequest(sampling_params=sampling, stream=stream, **fields)
    return list(vllm.Generate(request, timeout=TIMEOUT_S))


def _greedy(channel: grpc.Channel, n: int) -> tuple[list[int], str]:
    """modelserve.v1's own greedy output for PROMPT on the same port: token ids and text."""
    request = pb.GenerateRequest(
        prompt=PROMPT, params=pb.GenerationParameters(max_new_tokens=n, temperature=0, ignore_eos=True)
    )
    messages = list(pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=TIMEOUT_S))
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return [t for m in messages for t in m.token_ids], "".join(m.text for m in messages)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    error: Any = excinfo.value
    return error.code(), error.details()


def test_streaming_text_chunks_then_complete(vllm: Any, channel: grpc.Channel) -> None:
    *chunks, last = _generate(
        vllm, text=PROMPT, sampling_params={"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    )
    assert chunks and all(m.WhichOneof("response") == "chunk" for m in chunks)
    assert last.WhichOneof("response") == "complete"
    ids = [t for m in chunks for t in m.chunk.token_ids]
    assert len(ids) == 8 == sum(m.chunk.completion_tokens for m in chunks)  # counts per chunk, as vLLM's
    n_prompt = chunks[0].chunk.prompt_tokens
    assert n_prompt > 0 and all(m.chunk.prompt_tokens == n_prompt for m in chunks)
    complete = last.complete
    assert complete.finish_reason == "length"
    assert complete.completion_tokens == 8 and complete.prompt_tokens == n_prompt
    assert list(complete.output_ids) == list(chunks[-1].chunk.token_ids)  # the last chunk's again, as vLLM
    assert complete.WhichOneof("matched_stop") is None
    assert ids == _greedy(channel, 8)[0]  # the same engine, the same tokens as modelserve.v1 on this port


def test_tokenized_input_without_stream_sends_only_the_complete(vllm: Any, channel: grpc.Channel) -> None:
    prompt_ids = list(pb_grpc.GenerationServiceStub(channel).Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids)
    messages = _generate(
        vllm,
        stream=False,
        tokenized=vpb.TokenizedInput(original_text=PROMPT, input_ids=prompt_ids),
        sampling_params={"max_tokens": 6, "temperature": 0, "ignore_eos": True},
    )
    assert [m.WhichOneof("response") for m in messages] == ["complete"]
    complete = messages[0].complete
    assert complete.finish_reason == "length" and complete.prompt_tokens == len(prompt_ids)
    assert complete.completion_tokens == 6 == len(complete.output_ids)
    assert list(complete.output_ids) == _greedy(channel, 6)[0]


def test_stop_token_and_stop_string_say_which_matched(vllm: Any, channel: grpc.Channel) -> None:
    ids, text = _greedy(channel, 12)
    eos = set(pb_grpc.GenerationServiceStub(channel).ModelInfo(pb.ModelInfoRequest()).eos_token_ids)
    stop_token = next(t for t in ids[2:] if t not in eos)
    greedy = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    complete = _generate(vllm, stream=False, text=PROMPT, sampling_params={**greedy, "stop_token_ids": [stop_token]})
    assert complete[-1].complete.finish_reason == "stop"
    assert complete[-1].complete.matched_token_id == stop_token
    assert list(complete[-1].complete.output_ids) == ids[: ids.index(stop_token) + 1]

    stop = text.strip()[len(text.strip()) // 2 :][:3]
    complete = _generate(vllm, text=PROMPT, sampling_params={**greedy, "stop": [stop]})[-1].complete
    assert complete.finish_reason == "stop" and complete.matched_stop_str == stop
    assert complete.completion_tokens < 12


def test_logprobs_with_alternatives(vllm: Any) -> None:
    sampling = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    complete = _generate(vllm, stream=False, text=PROMPT, sampling_params=sampling)[-1].complete
    logprobs = complete.output_logprobs
    assert list(logprobs.token_ids) == list(complete.output_ids) and len(logprobs.token_logprobs) == 5
    assert all(len(top.token_ids) == 2 == len(top.values) for top in logprobs.top_logprobs)
    assert len(logprobs.top_logprobs) == 5


@pytest.mark.parametrize("stream", [True, False])
def test_prompt_logprobs_as_modelserve_v1_gives_them(vllm: Any, channel: grpc.Channel, stream: bool) -> None:
    """Every prompt token (the first with no value), on the first chunk or the complete message."""
    ours = pb.GenerateRequest(
        prompt=PROMPT, params=pb.GenerationParameters(max_new_tokens=2, temperature=0, prompt_logprobs=2)
    )
    messages = list(pb_grpc.GenerationServiceStub(channel).Generate(ours, timeout=TIMEOUT_S))
    expected = next(m.prompt_logprobs for m in messages if m.prompt_logprobs)
    sampling = {"max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    answer = [
        m.chunk if stream else m.complete for m in _generate(vllm, stream=stream, text=PROMPT, sampling_params=sampling)
    ]
    assert [m.HasField("input_logprobs") for m in answer] == [True] + [False] * (len(answer) - 1)
    scored = answer[0].input_logprobs
    assert len(scored.token_ids) == len(expected) + 1 and list(scored.token_ids)[1:] == [
        lp.chosen.token_id for lp in expected
    ]
    assert not scored.token_logprobs[0].HasField("value") and not scored.top_logprobs[0].token_ids
    assert [v.value for v in scored.token_logprobs[1:]] == pytest.approx([lp.chosen.logprob for lp in expected])
    assert [list(t.token_ids) for t in scored.top_logprobs[1:]] == [[t.token_id for t in lp.top] for lp in expected]


def test_penalties_bias_and_min_p_as_modelserve_v1_samples_them(vllm: Any, channel: grpc.Channel) -> None:
    """vLLM's sampling fields reach the same sampler as modelserve.v1's: the same seeded output on both faces,
    and a logit bias of +100 on one token makes every output token that token."""
    shared = {"temperature": 1.0, "seed": 5, "presence_penalty": 1.0, "frequency_penalty": 0.5, "min_p": 0.05}
    ours = pb.GenerateRequest(
        prompt=PROMPT, params=pb.GenerationParameters(max_new_tokens=10, ignore_eos=True, **shared)
    )
    expected = [
        t for m in pb_grpc.GenerationServiceStub(channel).Generate(ours, timeout=TIMEOUT_S) for t in m.token_ids
    ]
    sampling = {"max_tokens": 10, "ignore_eos": True, **shared}
    complete = _generate(vllm, stream=False, text=PROMPT, sampling_params=sampling)[-1].complete
    assert list(complete.output_ids) == expected

    biased = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "logit_bias": {42: 100.0}}
    complete = _generate(vllm, stream=False, text=PROMPT, sampling_params=biased)[-1].complete
    assert list(complete.output_ids) == [42] * 5


def test_n_samples_stream_with_their_index_and_share_the_prompt(vllm: Any) -> None:
    """n=3: every chunk and each sample's GenerateComplete carry its index; with a seed, sample j is what a
    lone request with seed + j samples; the later samples found the prompt's blocks cached by the first."""
    prompt = "Three samples of one prompt, computed once: " + " ".join(f"t{i}" for i in range(40))
    sampling = {"max_tokens": 6, "temperature": 1.0, "seed": 9, "ignore_eos": True, "n": 3}
    messages = _generate(vllm, text=prompt, request_id="three", sampling_params=sampling)
    chunks = [m.chunk for m in messages if m.WhichOneof("response") == "chunk"]
    completes = [m.complete for m in messages if m.WhichOneof("response") == "complete"]
    assert sorted(c.index for c in completes) == [0, 1, 2] and {c.index for c in chunks} == {0, 1, 2}
    ids = {j: [t for c in chunks if c.index == j for t in c.token_ids] for j in range(3)}
    assert all(len(ids[j]) == 6 for j in range(3))
    for j in (0, 2):
        alone = {**sampling, "n": 1, "seed": 9 + j}
        assert list(_generate(vllm, stream=False, text=prompt, sampling_params=alone)[-1].complete.output_ids) == ids[j]
    by_index = {c.index: c for c in completes}
    assert by_index[1].cached_tokens > 0 and by_index[2].cached_tokens > 0  # shared with sample 0

    whole = _generate(vllm, stream=False, text=prompt, sampling_params=sampling)
    assert sorted(m.complete.index for m in whole) == [0, 1, 2]
    assert {m.complete.index: list(m.complete.output_ids) for m in whole} == ids


@pytest.fixture()
def long_channel(long_server: ServerProcess) -> Iterator[grpc.Channel]:
    """A channel to the server whose streams may run LONG tokens: still running when the test acts."""
    with long_server.channel() as channel:
        yield channel


@pytest.mark.parametrize("n", [1, 2])
def test_abort_ends_a_running_stream_with_finish_reason_abort(long_channel: grpc.Channel, n: int) -> None:
    """As vLLM: the aborted stream's last message is a complete with "abort" (each sample's, for n > 1), and
    the call ends OK."""
    vllm = vpb_grpc.VllmEngineStub(long_channel)
    request = vpb.GenerateRequest(
        request_id="to-abort",
        text=PROMPT,
        stream=True,
        sampling_params=vpb.SamplingParams(max_tokens=LONG, ignore_eos=True, n=n),
    )
    call = vllm.Generate(request, timeout=TIMEOUT_S)
    first = next(call)
    assert first.WhichOneof("response") == "chunk"
    vllm.Abort(vpb.AbortRequest(request_ids=["to-abort", "no-such-request"]), timeout=TIMEOUT_S)
    completes = [m.complete for m in [first, *call] if m.WhichOneof("response") == "complete"]
    assert call.code() == grpc.StatusCode.OK
    assert sorted(c.index for c in completes) == list(range(n))
    assert all(c.finish_reason == "abort" and 0 < c.completion_tokens < LONG for c in completes)
    assert wait_idle(pb_grpc.GenerationServiceStub(long_channel)).requests_running == 0  # its row is freed


def test_model_info(vllm: Any, channel: grpc.Channel, model_dirs: dict[str, Path]) -> None:
    ours = pb_grpc.GenerationServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT_S)
    info = vllm.GetModelInfo(vpb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    assert info.model_path == info.tokenizer_path == str(model_dirs["llama"])
    assert info.served_model_name == ours.model_id
    assert info.is_generation and not info.supports_vision
    assert info.max_context_length == ours.max_sequence_length
    assert 0 < info.max_req_input_len < info.max_context_length
    assert info.vocab_size == ours.vocab_size and list(info.eos_token_ids) == list(ours.eos_token_ids)
    assert info.model_type == ours.model_type and list(info.architectures) == [ours.architecture]
    bos = [s.token_id for s in ours.special_tokens if s.role == "bos"]
    assert info.bos_token_id == (bos[0] if bos else 0)


def test_server_info_and_loads(vllm: Any) -> None:
    _generate(vllm, text=PROMPT, sampling_params={"max_tokens": 1})
    info = vllm.GetServerInfo(vpb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.server_type == "vllm-grpc" and not info.is_paused and info.data_parallel_size == 1
    assert info.uptime_seconds > 0 and info.last_receive_timestamp > 0
    assert info.model_dtype == "torch.float32" and info.kv_cache_dtype == "auto" and info.block_size > 0
    assert not info.kv_connector and not info.mm_processor

    loads = vllm.GetLoads(vpb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert loads.dp_rank_count == 1 and len(loads.loads) == 1 and loads.version.startswith("modelserve ")
    assert datetime.datetime.fromisoformat(loads.timestamp).tzinfo is not None
    load = loads.loads[0]
    assert load.dp_rank == 0 and load.max_running_requests == 8  # the server's --max-batch-size
    assert load.max_total_num_tokens > 0 and 0 <= load.token_usage <= 1
    assert load.num_total_reqs == load.num_running_reqs + load.num_waiting_reqs
    assert load.gen_throughput > 0, "a token was generated within the last seconds"
    assert 0 <= load.cache_hit_rate <= 1 and 0 <= load.utilization <= 1 and load.num_waiting_uncached_tokens >= 0


def test_the_tokenizer_bundle_is_what_the_server_serves_with(vllm: Any, model_dirs: dict[str, Path]) -> None:
    """GetTokenizer: one ZIP in chunks, its SHA-256 on the last; tokenizer.json as served, and the config."""
    import hashlib
    import io
    import json
    import zipfile

    chunks = list(vllm.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=TIMEOUT_S))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and not any(c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        served = json.loads(archive.read("tokenizer.json"))
        config = json.loads(archive.read("tokenizer_config.json"))
    on_disk = json.loads((model_dirs["llama"] / "tokenizer.json").read_text())
    assert served["model"]["vocab"] == on_disk["model"]["vocab"]
    assert "chat_template" not in config  # the tiny model has none, and the server none either


def test_flush_cache_drops_the_blocks_nobody_holds(vllm: Any) -> None:
    prompt = " ".join(["Once upon a time there was a fox"] * 8)
    sampling = {"max_tokens": 1, "temperature": 0}
    _generate(vllm, stream=False, text=prompt, sampling_params=sampling)
    again = _generate(vllm, stream=False, text=prompt, sampling_params=sampling)[-1].complete
    assert again.cached_tokens > 0
    answer = vllm.FlushCache(common_pb2.FlushCacheRequest(), timeout=TIMEOUT_S)
    assert answer.success and answer.message
    after = _generate(vllm, stream=False, text=prompt, sampling_params=sampling)[-1].complete
    assert after.cached_tokens == 0, "the flush reached the core before the next request (one command queue)"
    code, details = _refusal(lambda: vllm.StartProfile(common_pb2.StartProfileRequest(), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--profile-dir" in details  # not asked for here


def _trace(path: Path) -> dict[str, Any] | None:
    """The Chrome trace at `path` once the core has written all of it."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def test_start_and_stop_profile_write_a_trace_under_the_profile_dir(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """StartProfile / StopProfile (smg's /start_profile, /stop_profile): torch's profiler over the engine's
    steps, its Chrome trace written inside --profile-dir; by StopProfile, or after num_steps on its own."""
    profiles = tmp_path / "profiles"
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]), "--profile-dir", str(profiles))
    try:
        server.wait_serving()
        with server.channel() as channel:
            vllm = vpb_grpc.VllmEngineStub(channel)
            start = vllm.StartProfile
            for request, code, says in [
                (common_pb2.StartProfileRequest(output_dir="../elsewhere"), INVALID, "inside --profile-dir"),
                (common_pb2.StartProfileRequest(output_dir="/tmp"), INVALID, "inside --profile-dir"),
                (common_pb2.StartProfileRequest(activities=["GPU"]), INVALID, "allowed: ['CPU', 'MEM']"),
                (common_pb2.StartProfileRequest(profile_by_stage=True), INVALID, "profile_by_stage"),
            ]:
                got = _refusal(lambda r=request: start(r, timeout=TIMEOUT_S))
                assert got[0] == code and says in got[1], got
            stop = vllm.StopProfile
            got = _refusal(lambda: stop(common_pb2.StopProfileRequest(), timeout=TIMEOUT_S))
            assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "no profile is running" in got[1]

            began = start(common_pb2.StartProfileRequest(output_dir="run", record_shapes=True), timeout=TIMEOUT_S)
            assert began.success and str(profiles / "run") in began.message
            got = _refusal(lambda: start(common_pb2.StartProfileRequest(), timeout=TIMEOUT_S))
            assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "already running" in got[1]
            _generate(vllm, text=PROMPT, sampling_params={"max_tokens": 8, "temperature": 0, "ignore_eos": True})
            ended = stop(common_pb2.StopProfileRequest(), timeout=TIMEOUT_S)
            path = Path(ended.message.rsplit(" ", 1)[-1])
            assert ended.success and path.parent == profiles / "run"
            trace = wait_until(lambda: _trace(path), lambda t: t is not None, TIMEOUT_S)
            assert trace is not None and trace["traceEvents"], f"no trace at {path}"

            began = start(common_pb2.StartProfileRequest(num_steps=3), timeout=TIMEOUT_S)
            path = Path(began.message.split(" the trace goes to ", 1)[1].split(" ", 1)[0])
            _generate(vllm, text=PROMPT, sampling_params={"max_tokens": 8, "temperature": 0, "ignore_eos": True})
            trace = wait_until(lambda: _trace(path), lambda t: t is not None, TIMEOUT_S)  # no StopProfile
            assert trace is not None and trace["traceEvents"] and path.parent == profiles
            assert stop(common_pb2.StopProfileRequest(), timeout=TIMEOUT_S).success
    finally:
        assert server.terminate() == 0
    assert server.log_errors() == []


def test_kv_events_tell_the_blocks_stored_and_removed(vllm: Any, channel: grpc.Channel) -> None:
    """SubscribeKvEvents: a prompt's full blocks arrive as stored (its token ids, each chained to its parent);
    a flush removes them; a subscriber resuming from a sequence number gets the same batches again."""
    import queue
    import threading

    received: queue.SimpleQueue[Any] = queue.SimpleQueue()
    subscription = vllm.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=TIMEOUT_S)

    def read() -> None:
        try:
            for batch in subscription:
                received.put(batch)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    threading.Thread(target=read, daemon=True).start()
    tokens = list(range(100, 140))  # 40 ids: two full blocks of 16
    done = _generate(
        vllm, stream=False, tokenized=vpb.TokenizedInput(input_ids=tokens), sampling_params={"max_tokens": 1}
    )
    assert done[-1].complete.finish_reason
    stored: list[Any] = []
    first_sequence = 0
    while len(stored) < 2:
        batch = received.get(timeout=TIMEOUT_S)
        first_sequence = first_sequence or batch.sequence_number
        stored += [
            e.stored
            for e in batch.events
            if e.WhichOneof("data") == "stored" and list(e.stored.blocks[0].token_ids) in (tokens[:16], tokens[16:32])
        ]
    assert [list(s.blocks[0].token_ids) for s in stored] == [tokens[:16], tokens[16:32]]
    assert all(s.blocks[0].block_size == 16 for s in stored)
    assert not stored[0].HasField("parent_block_hash") and stored[1].parent_block_hash == stored[0].blocks[0].block_hash
    assert vllm.FlushCache(common_pb2.FlushCacheRequest(), timeout=TIMEOUT_S).success
    _generate(vllm, stream=False, text=PROMPT, sampling_params={"max_tokens": 1})  # a step carries the removal
    removed: set[int] = set()
    hashes = {s.blocks[0].block_hash for s in stored}
    while not hashes <= removed:
        batch = received.get(timeout=TIMEOUT_S)
        removed |= {h for e in batch.events if e.WhichOneof("data") == "removed" for h in e.removed.block_hashes}
    subscription.cancel()
    again = vllm.SubscribeKvEvents(
        common_pb2.SubscribeKvEventsRequest(start_sequence_number=first_sequence), timeout=TIMEOUT_S
    )
    replayed = next(iter(again))
    again.cancel()
    assert replayed.sequence_number == first_sequence


def test_health_for_the_vllm_service_name(vllm: Any, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=VLLM_SERVICE), timeout=TIMEOUT_S).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    answer = vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert answer.healthy and answer.message == "serving"
    assert VLLM_SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"mm_inputs": vpb.MultimodalInputs(mm_hashes=["h"])}, UNIMPLEMENTED, "mm_inputs"),
        ({"media_refs": vpb.MediaRefs(items=[vpb.MediaRef(url="x")])}, UNIMPLEMENTED, "media_refs"),
        ({"kv_transfer_params_json": "{}"}, UNIMPLEMENTED, "kv_transfer_params_json"),
        ({"sampling_params": {"min_p": 1.5}}, INVALID, "sampling_params.min_p must be in [0, 1]"),
        ({"sampling_params": {"presence_penalty": 3}}, INVALID, "sampling_params.presence_penalty must be in [-2, 2]"),
        ({"sampling_params": {"frequency_penalty": -3}}, INVALID, "sampling_params.frequency_penalty"),
        ({"sampling_params": {"logit_bias": {1: 200.0}}}, INVALID, "sampling_params.logit_bias[1] must be in"),
        ({"sampling_params": {"logit_bias": {-1: 2.0}}}, INVALID, "sampling_params.logit_bias key -1"),
        ({"sampling_params": {"n": 100000}}, INVALID, "sampling_params.n is 100000; at most"),
        ({"sampling_params": {"structural_tag": "{}"}}, UNIMPLEMENTED, "sampling_params.structural_tag"),
        ({"sampling_params": {"regex": "a(b"}}, INVALID, "sampling_params.regex is not valid"),
        ({"sampling_params": {"json_schema": "{"}}, INVALID, "sampling_params.json_schema is not valid JSON"),
        ({"sampling_params": {"choice": {"choices": []}}}, INVALID, "sampling_params.choice has 0 strings"),
        ({"sampling_params": {"prompt_logprobs": -1}}, INVALID, "sampling_params.prompt_logprobs must be in [0, 20]"),
        ({"data_parallel_rank": 1}, INVALID, "data_parallel_rank"),
        ({"sampling_params": {"max_tokens": 10**6}}, INVALID, "sampling_params.max_tokens"),
        # uint32 values past our int32 fields: refused by name, not an UNKNOWN with a traceback
        ({"sampling_params": {"max_tokens": 2**32 - 1}}, INVALID, "sampling_params.max_tokens must be in [0, "),
        ({"sampling_params": {"top_k": 2**31}}, INVALID, "sampling_params.top_k"),
        ({"sampling_params": {"stop_token_ids": [5, 2**32 - 1]}}, INVALID, "sampling_params.stop_token_ids[1]"),
        ({"sampling_params": {"logprobs": -1}}, INVALID, "sampling_params.logprobs"),
        ({"sampling_params": {"top_p": 1.5}}, INVALID, "sampling_params.top_p"),
    ],
    ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else None,
)
def test_refusals_name_the_field(vllm: Any, fields: dict[str, Any], code: grpc.StatusCode, named: str) -> None:
    code_seen, details = _refusal(lambda: _generate(vllm, text=PROMPT, **fields))
    assert code_seen == code and named in details, details


def test_refusals_of_input(vllm: Any) -> None:
    vocab_size = vllm.GetModelInfo(vpb.GetModelInfoRequest(), timeout=TIMEOUT_S).vocab_size
    tokenized = vpb.TokenizedInput(input_ids=[1, vocab_size])
    code, details = _refusal(lambda: _generate(vllm, tokenized=tokenized))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tokenized.input_ids[1]" in details, details
    code, details = _refusal(lambda: _generate(vllm))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input is not set" in details
    code, details = _refusal(lambda: vllm.Embed(vpb.EmbedRequest(), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "Embed" in details
    code, details = _refusal(lambda: vllm.GetLoads(vpb.GetLoadsRequest(dp_rank=1), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "dp_rank" in details


def test_the_refusal_table_names_real_fields() -> None:
    """unserved.py's vLLM names are fields of vLLM's GenerateRequest or SamplingParams (a typo would refuse
    nothing), and no OpenAI field is both served and refused."""
    request_fields = set(vpb.GenerateRequest.DESCRIPTOR.fields_by_name)
    sampling_fields = {f"sampling_params.{name}" for name in vpb.SamplingParams.DESCRIPTOR.fields_by_name}
    for entry in UNSERVED:
        assert set(entry.vllm) <= request_fields | sampling_fields, entry
        assert not set(entry.openai) & OPENAI_SERVED, entry
