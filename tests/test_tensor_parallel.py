"""Tensor parallelism on two CPU ranks (gloo): the real server with --tensor-parallel-size 2, its greedy output
equal token for token to transformers' generate() in fp32 for the tiny Llama and Qwen2, alone and joining a
running batch; rank 1 killed mid-stream ends the streams UNAVAILABLE and the health NOT_SERVING at once;
what cannot be split is refused at start-up, saying why."""

from __future__ import annotations

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

from bench.harness import wait_until
from modelserve.engine.tensor_parallel import check_shardable
from modelserve.models.loader import load_model
from tests.conftest import ServerProcess, start_server

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


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_server(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    path = model_dirs[request.param]
    server = start_server(
        tmp_path_factory.mktemp(f"tp-{request.param}"), "--model", str(path), "--tensor-parallel-size", "2"
    )
    try:
        server.wait_serving()
        yield server, path
    finally:
        assert server.terminate() == 0
    assert server.log_errors() == []


def test_two_ranks_give_generates_tokens_alone_and_joining_a_running_batch(
    tp_server: tuple[ServerProcess, Path],
) -> None:
    server, path = tp_server
    assert len(_rank_processes(server)) == 1, "rank 1 runs in a process of its own"
    expected = {prompt: _reference(path, prompt, NEW_TOKENS) for prompt in PROMPTS}
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for prompt in PROMPTS:  # alone
            assert [
                t for m in stub.Generate(_request(prompt, NEW_TOKENS), timeout=TIMEOUT_S) for t in m.token_ids
            ] == expected[prompt]
        # joining: a long stream runs, then each prompt joins its batch
        running = stub.Generate(_request(PROMPTS[1], 1500), timeout=TIMEOUT_S)
        first = next(running)
        while not first.token_ids:
            first = next(running)
        for prompt in PROMPTS:
            assert [
                t for m in stub.Generate(_request(prompt, NEW_TOKENS), timeout=TIMEOUT_S) for t in m.token_ids
            ] == expected[prompt]
        running.cancel()


def test_killing_rank_1_mid_stream_ends_the_streams_and_the_health_at_once(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]), "--tensor-parallel-size", "2")
    server.wait_serving()
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


def test_what_cannot_be_split_is_refused(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = load_model(str(model_dirs["llama"]), torch.device("cpu"), torch.float32).model.config
    check_shardable(config, 2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 must divide the model's num_attention_heads = 4"):
        check_shardable(config, 3)
    server = start_server(tmp_path, "--model", str(model_dirs["gpt2"]), "--tensor-parallel-size", "2")
    assert server.proc.wait(TIMEOUT_S) == 1
    assert "--tensor-parallel-size needs modelserve's own Llama-family forward; GPT2LMHeadModel" in server.log()
