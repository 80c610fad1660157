"""vLLM's metric names beside ours on /metrics, for the routers that read them (telemetry/vllm_aliases.py):
scraped from a real server while streams run, again once it is idle, and absent with --no-vllm-metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import is_idle, wait_idle
from modelserve.cli import config_from_args, parse_args
from tests.conftest import LONG, ServerProcess, start_server

ALIASES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
STREAMS = 4  # each of LONG tokens: all still generating when the scrape comes; cancelled after it


def _scrape(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], name: str) -> Any:
    (sample,) = families[name].samples
    return sample


def _until_decoding(call: Iterator[pb.GenerateResponse]) -> None:
    """Read a stream up to its first token: its request is in the batch from then on."""
    while not next(call).token_ids:
        pass


@pytest.fixture()
def long_stub(long_server: ServerProcess) -> Iterator[Any]:
    with long_server.channel() as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_vllm_names_beside_ours_under_load_and_back_to_zero(long_stub: Any, long_server: ServerProcess) -> None:
    stub = long_stub
    wait_idle(stub)  # an earlier test's streams may still be ending on the shared server
    model_id = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).model_id
    params = pb.GenerationParameters(max_new_tokens=LONG, ignore_eos=True)
    calls = [stub.Generate(pb.GenerateRequest(prompt=f"Stream {i}", params=params), timeout=60) for i in range(STREAMS)]
    try:
        for call in calls:
            _until_decoding(call)
        during = _scrape(long_server)
    finally:  # however the reads went: LONG streams would hold the shared server for many seconds
        for call in calls:
            call.cancel()

    for name in ALIASES:
        assert during[name].type == "gauge"
        assert _sample(during, name).labels == {"model_name": model_id, "engine": "0"}
    assert _sample(during, "vllm:num_requests_running").value == STREAMS  # all decoding, none done yet
    assert _sample(during, "vllm:num_requests_waiting").value == 0  # the batch holds 8
    assert 0 < _sample(during, "vllm:kv_cache_usage_perc").value <= 1
    # Ours, in the same scrape, from the same engine stats.
    assert _sample(during, "modelserve_requests_running").value == STREAMS
    assert 0 < _sample(during, "modelserve_kv_cache_usage").value <= 1

    budget_tokens = stub.Health(pb.HealthRequest(), timeout=10).kv_cache_budget_tokens
    info = _sample(during, "vllm:cache_config_info")
    assert info.value == 1 and during["vllm:cache_config_info"].type == "gauge"
    block_size = int(info.labels["block_size"])
    assert block_size > 1 and int(info.labels["num_gpu_blocks"]) == budget_tokens // block_size
    lora = _sample(during, "vllm:lora_requests_info")  # LoRA off: no adapters, said as vLLM says it
    assert lora.labels == {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert lora.value > 0  # when the adapters in use last changed: the server's start

    assert is_idle(wait_idle(stub))  # the server's own state, polled until idle (bounded)
    after = _scrape(long_server)
    assert _sample(after, "vllm:num_requests_running").value == 0
    assert _sample(after, "vllm:num_requests_waiting").value == 0
    assert _sample(after, "vllm:kv_cache_usage_perc").value == 0


def test_no_vllm_metrics_leaves_only_ours(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]), "--no-vllm-metrics", "--no-warmup")
    try:
        server.wait_serving()  # the engine is attached, so the aliases would be there by now
        names = _scrape(server)
    finally:
        server.terminate()
    assert "modelserve_requests_running" in names and "modelserve_kv_cache_usage" in names
    assert not [name for name in names if name.startswith("vllm:")]


@pytest.mark.parametrize(
    ("argv", "env", "expected"), [([], "", True), (["--no-vllm-metrics"], "", False), ([], "0", False)]
)
def test_flag_and_environment(argv: list[str], env: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELSERVE_VLLM_METRICS", raising=False)
    if env:
        monkeypatch.setenv("MODELSERVE_VLLM_METRICS", env)
    assert config_from_args(parse_args(["serve", *argv])).vllm_metrics is expected
