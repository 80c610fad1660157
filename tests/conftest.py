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
# A stream a test acts on while it runs (cancel, abort, drain, a scrape) asks for LONG tokens of the long
# model: many seconds of generation, so it is still running however loaded the machine is. (1,500-2,000
# tokens of the 2,048-token model were 1-4 s here: a loaded CI run once finished such a stream first.)
LONG_CONTEXT = 8192
LONG = 8000
KV_BYTES_PER_TOKEN = 512  # the tiny Llama's: 2 layers x (keys, values) x 2 KV heads x 16 dims x 4 bytes (float32)


def long_args(rows: int = 8) -> tuple[str, ...]:
    """Server flags for the long model: KV for `rows` whole contexts, and LONG new tokens allowed."""
    return ("--kv-cache-bytes", str(rows * LONG_CONTEXT * KV_BYTES_PER_TOKEN), "--max-max-new-tokens", str(LONG))


@pytest.fixture(autouse=True)
def pack_small_linears(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process engines pack even the tiny models' fp32 linears, as every real model's are packed
    (engine/cpu_linears.py keeps only weights under SMALL_FP32_WEIGHT elements as loaded), so the equality
    tests cover the path real models take. The servers the tests start keep the threshold, and with it the
    other path; so do tests marked small_linears_as_loaded."""
    if request.node.get_closest_marker("small_linears_as_loaded") is None:
        from modelserve.engine import cpu_linears

        monkeypatch.setattr(cpu_linears, "SMALL_FP32_WEIGHT", 0)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: model_dir(f"tiny-{arch}", root) for arch in ARCHS}


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a LONG_CONTEXT-token context (its weights are the tiny Llama's)."""
    return model_dir("tiny-llama-long", tmp_path_factory.mktemp("long-model"))


@pytest.fixture(scope="session")
def long_server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose streams may run LONG tokens, for the tests that act on a stream while it runs."""
    server = start_server(
        tmp_path_factory.mktemp("long-server"), "--model", str(long_model_dir), "--max-batch-size", "8", *long_args()
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


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
        # 1,504 tokens of KV (94 blocks of 16, 512 bytes a token for this model): less than its 2,048-token context.
        "--kv-cache-bytes",
        str(1504 * 512),
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
