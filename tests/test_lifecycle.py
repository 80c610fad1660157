"""The demo server as `make serve` runs it: health NOT_SERVING -> SERVING, the
client CLI streaming, cancellation and deadlines freeing the engine, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from bench.harness import wait_until
from modelserve.config import Config
from modelserve.engine.request import EngineStats
from modelserve.server.core.serving import Phase, RequestFailed, Serving
from modelserve.server.grpc.servicer import GenerationServicer
from modelserve.server.grpc.vllm import VllmEngineServicer
from modelserve.server.openai.app import _Api
from tests.conftest import ServerProcess, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, list[int]]]:
    """The demo model (built into a fresh cache), one row at a time so a held row is visible."""
    tmp = tmp_path_factory.mktemp("demo")
    server = start_server(tmp, "--cache-dir", str(tmp / "cache"), "--max-batch-size", "1", "--grace-s", "3")
    try:
        seen = server.wait_serving()
        yield server, seen
    finally:
        server.terminate()


def test_health_is_not_serving_until_loaded_then_serving(demo: tuple[ServerProcess, list[int]]) -> None:
    server, seen = demo
    assert seen[0] == NOT_SERVING and seen[-1] == SERVING, seen
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "modelserve.v1.GenerationService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    log = server.log()
    assert "DEMO model" in log and "random" in log and "ready: serving" in log


def test_each_process_freezes_its_start_up_heap_before_serving(demo: tuple[ServerProcess, list[int]]) -> None:
    """Both processes move what start-up made (torch, transformers, the model) out of the cyclic collector's
    reach, so no full collection over it stalls the streams later (modelserve.gc_heap)."""
    server, _ = demo
    log = server.log()
    for process in ("frontend", "engine core"):  # each is logged before health says SERVING, which `demo` saw
        found = re.search(rf"{process}: (\d+) start-up objects frozen", log)
        assert found and int(found.group(1)) > 10_000, log  # torch alone brings far more


def test_client_cli_streams_text(demo: tuple[ServerProcess, list[int]]) -> None:
    server, _ = demo
    cli = Path(sys.executable).parent / "modelserve-client"
    done = subprocess.run(
        [str(cli), "--address", server.address, "generate", "Hello", "--max-new-tokens", "16", "--ignore-eos", "-v"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip()
    assert "FINISH_REASON_LENGTH | 1 in, 16 out" in done.stderr or "16 out" in done.stderr, done.stderr


def _second_request_completes(channel: grpc.Channel) -> pb.GenerateResponse:
    """With one batch row, this only finishes if the row held before was freed."""
    stub = pb_grpc.GenerationServiceStub(channel)
    request = pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(max_new_tokens=3, ignore_eos=True))
    *_, last = stub.Generate(request, timeout=60)  # a held row shows as this deadline passing
    return last


def _long_request() -> pb.GenerateRequest:
    # ~2,000 tokens: far longer than the follow-up request's deadline.
    return pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(max_new_tokens=2000, ignore_eos=True))


def _assert_quiet(server: ServerProcess) -> None:
    """Normal caller behaviour (cancel, disconnect, deadline) writes no ERROR line and no traceback."""
    assert server.log_errors() == [], server.log()


def test_cancelled_stream_frees_the_engine(demo: tuple[ServerProcess, list[int]]) -> None:
    server, _ = demo
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(_long_request(), timeout=120)
        next(call), next(call)  # it is running
        call.cancel()
        assert _second_request_completes(channel).finish_reason == pb.FINISH_REASON_LENGTH
        health = stub.Health(pb.HealthRequest())
        assert (health.requests_running, health.requests_waiting) == (0, 0)
    _assert_quiet(server)


def test_deadline_ends_generation_and_frees_the_engine(demo: tuple[ServerProcess, list[int]]) -> None:
    server, _ = demo
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_long_request(), timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert _second_request_completes(channel).finish_reason == pb.FINISH_REASON_LENGTH
    _assert_quiet(server)


def test_sigterm_stops_cleanly(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Its own server: no test depends on running after another."""
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]))
    server.wait_serving()
    assert server.terminate(timeout_s=30) == 0
    log = server.log()
    assert "shutting down" in log and "stopped" in log
    assert server.log_errors() == []
    with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # type: ignore[attr-defined]


def test_sigterm_while_loading_stops_cleanly_and_ends_the_core(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The engine core is spawned before the model is read (its imports run beside the frontend's); a
    SIGTERM in that time ends the server normally, with no error, and its child processes with it."""
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]))
    children = wait_until(psutil.Process(server.proc.pid).children, bool, 60)
    assert children, f"no engine core process was spawned; log:\n{server.log()}"
    assert "ready: serving" not in server.log()  # still loading (its imports take seconds): the case tested
    assert server.terminate(timeout_s=30) == 0
    assert "ready: serving" not in server.log() and server.log_errors() == []
    assert wait_until(lambda: [c for c in children if _alive(c)], lambda alive: not alive, 30) == []


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


MODEL = SimpleNamespace(model_id="tiny", device="cpu", dtype="torch.float32", weight_bytes=0)  # what Health reads


def test_every_face_tells_the_same_health_from_one_place() -> None:
    """Serving.health() is the one answer: the engine gone while the phase still says SERVING is FAILED for a
    refused call, for vLLM's HealthCheck and GetServerInfo, for the Health RPC and for HTTP /health alike (each
    once decided it for itself; the Health RPC said SERVING). grpc.health.v1 is the lifecycle's to set, at each
    change."""
    serving = Serving(Config())
    vllm, ours, http = VllmEngineServicer(serving), GenerationServicer(serving), _Api(serving, None, False)
    engine = SimpleNamespace(alive=True, stats=EngineStats)
    cases = [
        (Phase.LOADING, True, Phase.LOADING, "the model is still loading; retry when the check passes"),
        (Phase.SERVING, True, Phase.SERVING, ""),
        (Phase.SERVING, False, Phase.FAILED, "the engine has failed; the server must be restarted"),
        (Phase.DRAINING, True, Phase.DRAINING, "the server is shutting down; retry on another replica"),
        (Phase.FAILED, False, Phase.FAILED, "the engine has failed; the server must be restarted"),
    ]
    for phase, alive, reported, refusal in cases:
        serving.phase, engine.alive = phase, alive
        loaded = phase is not Phase.LOADING
        serving.engine, serving.model = (cast(Any, engine), cast(Any, MODEL)) if loaded else (None, None)
        health = serving.health()
        assert (health.phase, health.up) == (reported, not refusal), (phase, alive, health)
        checked = asyncio.run(vllm.HealthCheck(None, None))
        assert (checked.healthy, checked.message) == (health.up, health.why)
        assert asyncio.run(vllm.GetServerInfo(None, None)).is_paused is not health.up
        rpc = asyncio.run(ours.Health(pb.HealthRequest(), cast(Any, None)))
        assert rpc.state == reported.value and rpc.model_loaded is (reported in (Phase.SERVING, Phase.DRAINING))
        page = asyncio.run(http.health(cast(Any, None)))
        assert page.status_code == (200 if health.up else 503)
        assert json.loads(bytes(page.body)) == {"status": reported.name.lower()}
        if refusal:
            with pytest.raises(RequestFailed) as refused:
                serving.ready("the check passes")
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE and str(refused.value) == refusal
