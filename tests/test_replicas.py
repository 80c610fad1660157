"""Many replicas: the client SDK's target and service config, its health checking against a NOT_SERVING
server, and three real replicas through SIGTERM and SIGKILL under load (the scenario of bench/replicas.py,
one implementation, with its pass conditions asserted)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from modelserve_client import AsyncModelServeClient, channel_target, retry_service_config, service_config
from modelserve_client import cli as client_cli
from modelserve_client.client import HEALTH_SERVICE_NAME
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from bench import replicas
from modelserve.server.grpc.servicer import SERVICE_NAME

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("localhost:50051", "localhost:50051"),
        (
            "dns:///modelserve-headless.ml.svc.cluster.local:50051",
            "dns:///modelserve-headless.ml.svc.cluster.local:50051",
        ),
        ("ipv4:10.0.0.7:1,10.0.0.8:1", "ipv4:10.0.0.7:1,10.0.0.8:1"),
        (["10.0.0.7:50051", "10.0.0.8:50051"], "ipv4:10.0.0.7:50051,10.0.0.8:50051"),
        ("10.0.0.7:50051, 10.0.0.8:50051", "ipv4:10.0.0.7:50051,10.0.0.8:50051"),
        (("[fd00::7]:50051", "[::1]:50052"), "ipv6:[fd00::7]:50051,[::1]:50052"),
        (["localhost:50051"], "localhost:50051"),
    ],
)
def test_channel_target(address: str | list[str], target: str) -> None:
    assert channel_target(address) == target


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (["a.example:1", "b.example:1"], "dns:///NAME:PORT"),
        (["10.0.0.7:1", "[::1]:1"], "not both"),
        (["10.0.0.7", "10.0.0.8"], "with ports"),
        (["::1:1", "::2:1"], "with ports"),  # an IPv6 address needs its brackets before the port
        ([], "no address"),
    ],
)
def test_channel_target_refuses_what_grpc_cannot_balance(address: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_target(address)


def test_service_config_adds_round_robin_and_health_checking_to_the_retries() -> None:
    config = json.loads(service_config(3))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # The name the server's readiness answers for: NOT_SERVING while loading, draining, or without an engine.
    assert config["healthCheckConfig"] == {"serviceName": HEALTH_SERVICE_NAME} == {"serviceName": SERVICE_NAME}
    assert config["methodConfig"] == json.loads(retry_service_config(3))["methodConfig"]
    assert "healthCheckConfig" not in json.loads(service_config(1, health_check=False))


def test_three_replicas_through_sigterm_and_sigkill_under_load(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    result = asyncio.run(replicas.scenario(model_dirs["llama"], tmp_path))
    assert result.problems() == [], replicas.table(result)
    # SIGTERM lost no call. SIGKILL failed, with UNAVAILABLE, exactly the streams the killed replica had accepted
    # (its modelserve-server-id header) and not finished when it died; every other call succeeded, in time.
    assert result.failed == result.failed_codes["UNAVAILABLE"] > 0
    assert result.max_gap_s < replicas.MAX_GAP_S


class _DrainingGeneration(pb_grpc.GenerationServiceServicer):  # type: ignore[misc]
    """GenerationService's detailed Health only, answering DRAINING; counts the calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.HealthResponse:
        self.calls += 1
        return pb.HealthResponse(state=pb.SERVER_STATE_DRAINING)


async def test_a_not_serving_replica_gets_no_calls_unless_health_checking_is_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The channel itself keeps calls off a replica whose grpc.health.v1 says NOT_SERVING; health_check=False,
    and the CLI's `health`, reach it anyway, to ask what it is doing."""
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(HEALTH_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    generation = _DrainingGeneration()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pb_grpc.add_GenerationServiceServicer_to_server(generation, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        for checked in ([address, address], address):  # a list of replicas is checked by default
            health_check = True if checked == address else None
            async with AsyncModelServeClient(checked, timeout_s=10, health_check=health_check) as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.health()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "unhealthy" in (refused.value.details() or "")
        assert generation.calls == 0
        # One host:port is not checked by default (no other replica to go to: the server's own answer is
        # better), nor with health_check=False.
        for health_check in (None, False):
            async with AsyncModelServeClient(address, timeout_s=10, health_check=health_check) as client:
                assert (await client.health()).state == pb.SERVER_STATE_DRAINING
        assert await asyncio.to_thread(client_cli.run, ["--address", address, "health"]) == 0
        assert "state:" in capsys.readouterr().out and generation.calls == 3
    finally:
        await server.stop(None)
