"""Shared fixtures: tiny random models built once per session, and real server processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelserve.models.random_init import build_random_model

ARCHS = ("gpt2", "llama", "qwen2")
START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_random_model(root / arch, arch, seed=7) for arch in ARCHS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A `modelserve serve` process on a loopback port."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    metrics_port: int

    def channel(self) -> grpc.Channel:
        # Retry a not-yet-open port quickly, so a Watch sees the server from its first moment.
        return grpc.insecure_channel(
            self.address, options=[("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextlib.contextmanager
    def watch_health(self, service: str = "") -> Iterator[Iterator[int]]:
        """Statuses from grpc.health.v1 Watch, from the first moment the port answers.

        A context manager, not a generator: the call and its channel are closed when the block ends,
        also when a test fails inside it, never later by the garbage collector (closing a sync channel
        from a finalizer can hang the interpreter).
        """
        channel = self.channel()
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=START_TIMEOUT_S, wait_for_ready=True
        )
        try:
            yield (message.status for message in call)
        finally:
            call.cancel()
            channel.close()

    def wait_serving(self) -> list[int]:
        """Block until SERVING (a Watch stream, not polling); return the statuses seen."""
        seen: list[int] = []
        try:
            with self.watch_health() as statuses:
                for status in statuses:
                    seen.append(status)
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return seen
        except grpc.RpcError as exc:
            raise AssertionError(f"server never became SERVING ({exc}); log:\n{self.log()}") from exc
        raise AssertionError(f"health stream ended before SERVING; log:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit code; a server that does not stop in time is killed, and fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / f"server-{port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelserve",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            *args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    return ServerProcess(proc, f"127.0.0.1:{port}", log_path, metrics_port)


@pytest.fixture(scope="session")
def llama_server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main end-to-end server: the tiny Llama model, batches of up to 8."""
    server = start_server(
        tmp_path_factory.mktemp("llama-server"),
        "--model",
        str(model_dirs["llama"]),
        "--max-batch-size",
        "8",
        "--grace-s",
        "5",
        # 1,500 tokens of KV (512 bytes a token for this model): less than its 2,048-token context.
        "--kv-cache-bytes",
        str(1500 * 512),
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


@pytest.fixture()
def stub(llama_server: ServerProcess) -> Iterator[object]:
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    with llama_server.channel() as channel:
        yield pb_grpc.GenerationServiceStub(channel)
