"""Tensor parallelism on two CPU ranks (gloo): the real server with --tensor-parallel-size 2, its greedy output
equal token for token to transformers' generate() in fp32 for the tiny Llama and Qwen2, alone and joining a
running batch; rank 1 killed mid-stream ends the streams UNAVAILABLE and the health NOT_SERVING at once;
what cannot be split is refused at start-up, saying why; a rank places only its shard on its device."""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from bench.harness import terminate_all, wait_until
from modelserve.engine.tensor_parallel import check_shardable, shard
from modelserve.models.loader import load_model, load_model_info, load_weights
from modelserve.models.quantize import weight_bytes
from tests.conftest import ServerProcess, start_server

ARCHS = ("llama", "qwen2")
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello"]
NEW_TOKENS = 16
TIMEOUT_S = 60.0
pytestmark = pytest.mark.timeout(300)


def _request(prompt: str, n: int) -> pb.GenerateRequest:
    params = pb.GenerationParameters(max_new_tokens=n, temperature=0, ignore_eos=True)
    return pb.GenerateRequest(prompt=prompt, params=params)


def _reference(path: Path, prompt: str, n: int) -> list[int]:
    loaded = load_model(str(path), torch.device("cpu"), torch.float32)
    ids = torch.tensor([loaded.encode(prompt)])
    out = loaded.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return list(out[0, ids.shape[1] :].tolist())


def _rank_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's other ranks: processes of `python -m modelserve.engine.tensor_parallel`."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in children if "modelserve.engine.tensor_parallel" in " ".join(p.cmdline())]


def _ids(stub: pb_grpc.GenerationServiceStub, prompt: str) -> list[int]:
    return [t for m in stub.Generate(_request(prompt, NEW_TOKENS), timeout=TIMEOUT_S) for t in m.token_ids]


@pytest.fixture(scope="module")
def tp_servers(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """A two-rank server for each tested Llama-family model, started side by side."""
    logs = tmp_path_factory.mktemp("tp")
    servers = {
        arch: start_server(logs, "--model", str(model_dirs[arch]), "--tensor-parallel-size", "2", name=arch)
        for arch in ARCHS
    }
    try:
        for server in servers.values():
            server.wait_serving()
        yield servers
    finally:
        terminate_all(list(servers.values()))
    for server in servers.values():
        assert server.log_errors() == [] or server.proc.returncode != 0  # the killed one logs its rank's death


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_give_generates_tokens_alone_and_joining_a_running_batch(
    tp_servers: dict[str, ServerProcess], model_dirs: dict[str, Path], arch: str
) -> None:
    server = tp_servers[arch]
    assert len(_rank_processes(server)) == 1, "rank 1 runs in a process of its own"
    whole = weight_bytes(load_model(str(model_dirs[arch]), torch.device("cpu"), torch.float32).model)
    expected = {prompt: _reference(model_dirs[arch], prompt, NEW_TOKENS) for prompt in PROMPTS}
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Every rank's weights: the shards, and the embeddings and LM head each rank holds whole.
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT_S).weight_bytes > whole
        for prompt in PROMPTS:  # alone
            assert _ids(stub, prompt) == expected[prompt]
        # joining: a long stream runs, then each prompt joins its batch
        running = stub.Generate(_request(PROMPTS[1], 1500), timeout=TIMEOUT_S)
        first = next(running)
        while not first.token_ids:
            first = next(running)
        for prompt in PROMPTS:
            assert _ids(stub, prompt) == expected[prompt]
        assert server.metric("modelserve_requests_running") >= 1, "they joined the long stream's batch"
        running.cancel()


def test_killing_rank_1_mid_stream_ends_the_streams_and_the_health_at_once(
    tp_servers: dict[str, ServerProcess],
) -> None:
    """Last in this module: it ends the Llama server."""
    server = tp_servers["llama"]
    errors: list[grpc.RpcError] = []
    with server.watch_health() as statuses, server.channel() as channel:
        assert next(statuses) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationServiceStub(channel)

        def stream() -> None:
            try:
                for _ in stub.Generate(_request(PROMPTS[0], 1800), timeout=TIMEOUT_S):
                    pass
            except grpc.RpcError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for thread in threads:
            thread.start()
        (rank1,) = _rank_processes(server)
        running = wait_until(lambda: server.metric("modelserve_requests_running"), lambda n: n >= 2, TIMEOUT_S)
        assert running >= 2, "both streams decoding"
        killed_s = time.monotonic()
        rank1.send_signal(signal.SIGKILL)
        assert next(statuses) == health_pb2.HealthCheckResponse.NOT_SERVING
        health_s = time.monotonic() - killed_s
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert health_s < 1.0, f"NOT_SERVING {health_s:.2f} s after rank 1 died"
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 2, [e.details() for e in errors]
    assert server.proc.wait(TIMEOUT_S) != 0
    assert "tensor-parallel rank 1" in server.log()


def test_what_cannot_be_split_is_refused(model_dirs: dict[str, Path]) -> None:
    """Checked as each rank loads its shard, before any collective: the server's start-up fails with it."""
    llama = load_model(str(model_dirs["llama"]), torch.device("cpu"), torch.float32)
    check_shardable(llama.model.config, 2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 must divide the model's num_attention_heads = 4"):
        check_shardable(llama.model.config, 3)
    gpt2 = load_model(str(model_dirs["gpt2"]), torch.device("cpu"), torch.float32)
    refusal = "--tensor-parallel-size needs modelserve's own Llama-family forward; GPT2LMH"
    with pytest.raises(ValueError, match=refusal):
        shard(gpt2.model, 0, 2)
    with pytest.raises(ValueError, match=r"own Llama-family forward; LlamaForCausalLM .* without --no-own-forward"):
        shard(llama.model, 0, 2, own_forward=False)  # refused before the rank places anything


def test_a_rank_places_only_its_shard_on_its_device(model_dirs: dict[str, Path]) -> None:
    """The shard is cut from the checkpoint as loaded on the CPU, before the weights go to the rank's device,
    so a model larger than one device loads: rank 1 of 2 holds the second half of each column-parallel
    layer's rows and of each row-parallel layer's columns, and its placed weights are less than the whole."""
    whole = load_model(str(model_dirs["llama"]), torch.device("cpu"), torch.float32)
    info = load_model_info(str(model_dirs["llama"]), torch.device("cpu"), torch.float32)
    rank1 = load_weights(info, before_placing=functools.partial(shard, rank=1, world=2))
    for full, part in zip(whole.model.model.layers, rank1.model.model.layers, strict=True):
        rows = full.self_attn.q_proj.weight.shape[0] // 2
        assert torch.equal(part.self_attn.q_proj.weight, full.self_attn.q_proj.weight[rows:])
        columns = full.mlp.down_proj.weight.shape[1] // 2
        assert torch.equal(part.mlp.down_proj.weight, full.mlp.down_proj.weight[:, columns:])
    assert rank1.weight_bytes == weight_bytes(rank1.model) < weight_bytes(whole.model)
