"""Shared fixtures: tiny random models built once per session, and real server processes.

The server launcher lives in bench/harness.py (one for the benchmarks and the tests); it is
re-exported here for the tests that import it from tests.conftest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import START_TIMEOUT_S, ServerProcess, free_port, model_dir, start_server

__all__ = ["START_TIMEOUT_S", "ServerProcess", "free_port", "start_server"]

ARCHS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: model_dir(f"tiny-{arch}", root) for arch in ARCHS}


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
