"""Telemetry: GenAI and modelserve metrics for a known sequence of requests (in-memory
reader), and a real scrape of the running server's /metrics endpoint."""

from __future__ import annotations

import urllib.request
from typing import Any

import grpc
import pytest
from modelserve_client.v1 import generation_pb2 as pb
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from modelserve.engine.request import EngineStats, StepRecord
from modelserve.telemetry.metrics import (
    REQUEST_DURATION_BUCKETS_S,
    TIME_TO_FIRST_TOKEN_BUCKETS_S,
    TOKEN_USAGE_BUCKETS,
    GenerationMetrics,
    RequestOutcome,
)
from tests.conftest import ServerProcess


def _collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def _point(metric: Any, **attrs: str) -> Any:
    """The one data point with these attributes (and no error.type unless asked for)."""
    points = [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attrs.items())
        and ("error.type" in attrs or "error.type" not in p.attributes)
    ]
    assert len(points) == 1, (metric.name, attrs, [dict(p.attributes) for p in metric.data.data_points])
    return points[0]


def test_known_sequence_in_memory() -> None:
    reader = InMemoryMetricReader()
    metrics = GenerationMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"), "tiny-model")
    metrics.attach_engine(lambda: EngineStats(running=3, waiting=2, kv_budget_tokens=200, kv_tokens_used=50))
    metrics.request_finished(RequestOutcome(12, 10, "length", 0.01, 0.05, 0.50, mean_logprob=-1.25))
    metrics.request_finished(RequestOutcome(8, 4, "eos_token", 0.02, 0.03, 0.33))
    metrics.request_finished(RequestOutcome(5, 2, "cancelled", 0.01, 0.02, 0.10))  # the caller left
    metrics.request_rejected("invalid_argument")
    metrics.record_step(StepRecord(batch_size=3, prefill_tokens=0, prefill_s=0.0, decode_s=0.04))
    metrics.record_step(StepRecord(batch_size=5, prefill_tokens=128, prefill_s=0.2, decode_s=0.06))
    found = _collect(reader)

    base = {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": "tiny-model"}
    duration = found["gen_ai.server.request.duration"]
    assert duration.unit == "s"
    ok = _point(duration, **base)
    assert "error.type" not in ok.attributes and ok.count == 2 and ok.sum == pytest.approx(0.83)
    assert list(ok.explicit_bounds) == pytest.approx(REQUEST_DURATION_BUCKETS_S)
    assert _point(duration, **{"error.type": "cancelled"}).count == 1

    ttft = found["gen_ai.server.time_to_first_token"]
    assert ttft.unit == "s" and list(_point(ttft, **base).explicit_bounds) == pytest.approx(
        TIME_TO_FIRST_TOKEN_BUCKETS_S
    )
    tpot = found["gen_ai.server.time_per_output_token"]
    # (duration - ttft) / (output tokens - 1): (0.50-0.05)/9 and (0.33-0.03)/3
    assert _point(tpot, **base).sum == pytest.approx(0.45 / 9 + 0.30 / 3)

    usage = found["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    inputs = [p for p in usage.data.data_points if p.attributes["gen_ai.token.type"] == "input"]
    outputs = [p for p in usage.data.data_points if p.attributes["gen_ai.token.type"] == "output"]
    assert sum(p.sum for p in inputs) == 25 and sum(p.sum for p in outputs) == 16
    assert list(inputs[0].explicit_bounds) == [float(b) for b in TOKEN_USAGE_BUCKETS]

    assert _point(found["modelserve.output.tokens"], **base).value == 16
    finished = found["modelserve.requests.finished"]
    assert {p.attributes["finish_reason"]: p.value for p in finished.data.data_points} == {
        "length": 1,
        "eos_token": 1,
        "cancelled": 1,
    }
    assert _point(found["modelserve.requests.rejected"], **{"error.type": "invalid_argument"}).value == 1
    assert _point(found["modelserve.requests.running"], **base).value == 3
    assert _point(found["modelserve.requests.waiting"], **base).value == 2
    assert _point(found["modelserve.kv_cache.usage"], **base).value == pytest.approx(0.25)
    assert found["modelserve.request.queue.duration"].unit == "s"
    batch = _point(found["modelserve.engine.batch_size"], **base)
    assert (batch.count, batch.sum) == (2, 8)
    steps = found["modelserve.engine.step.duration"]
    decode = _point(steps, **{"modelserve.step.phase": "decode"})
    prefill = _point(steps, **{"modelserve.step.phase": "prefill"})
    assert decode.count == 2 and decode.sum == pytest.approx(0.10) and prefill.count == 1
    confidence = _point(found["modelserve.response.token_nll"], **base)
    assert confidence.count == 1 and confidence.sum == pytest.approx(1.25)  # mean logprob -1.25, negated


def _scrape(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    """Sum of the matching samples; 0 for a family with no samples yet (absent from the scrape)."""
    samples = families[family].samples if family in families else []
    return sum(s.value for s in samples if s.name == sample_name and labels.items() <= s.labels.items())


def test_real_scrape_of_the_running_server(stub: Any, llama_server: ServerProcess) -> None:
    before = _scrape(llama_server)
    finished_before = _value(before, "modelserve_requests_finished", "modelserve_requests_finished_total")
    rejected_before = _value(
        before, "modelserve_requests_rejected", "modelserve_requests_rejected_total", error_type="invalid_argument"
    )
    for _ in range(2):
        list(stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(max_new_tokens=6))))
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(top_p=2.0))))

    after = _scrape(llama_server)
    duration = after["gen_ai_server_request_duration_seconds"]
    assert duration.type == "histogram"
    assert _value(after, "gen_ai_server_request_duration_seconds", "gen_ai_server_request_duration_seconds_count") >= 2
    assert _value(after, "gen_ai_server_request_duration_seconds", "gen_ai_server_request_duration_seconds_sum") > 0
    for name in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"):
        assert after[name].type == "histogram" and _value(after, name, f"{name}_count") >= 2
    assert _value(after, "gen_ai_client_token_usage", "gen_ai_client_token_usage_sum", gen_ai_token_type="output") >= 2
    assert _value(after, "modelserve_requests_finished", "modelserve_requests_finished_total") >= finished_before + 2
    assert (
        _value(
            after, "modelserve_requests_rejected", "modelserve_requests_rejected_total", error_type="invalid_argument"
        )
        == rejected_before + 1
    )
    for gauge in ("modelserve_requests_running", "modelserve_requests_waiting", "modelserve_kv_cache_usage"):
        assert after[gauge].type == "gauge"
    steps = "modelserve_engine_step_duration_seconds"
    assert _value(after, steps, f"{steps}_count", modelserve_step_phase="decode") > 0
    assert _value(after, steps, f"{steps}_count", modelserve_step_phase="prefill") > 0
    assert _value(after, "modelserve_engine_batch_size", "modelserve_engine_batch_size_count") > 0
    confidence = "modelserve_response_token_nll"
    assert _value(after, confidence, f"{confidence}_count") >= 2
    assert _value(after, confidence, f"{confidence}_sum") > 0  # a random model is far from certain
    assert _value(after, "modelserve_output_tokens", "modelserve_output_tokens_total") > 0
    rpc = "rpc_server_call_duration_seconds"
    generate = "modelserve.v1.GenerationService/Generate"
    assert after[rpc].type == "histogram"
    ok = _value(after, rpc, f"{rpc}_count", rpc_method=generate, rpc_status_code="OK", rpc_system_name="grpc")
    bad = _value(after, rpc, f"{rpc}_count", rpc_method=generate, rpc_status_code="INVALID_ARGUMENT")
    assert ok >= 2 and bad >= 1
    assert _value(after, rpc, f"{rpc}_count", rpc_method=generate, error_type="INVALID_ARGUMENT") == bad


def test_dashboard_uses_only_metrics_the_server_exports(stub: Any, llama_server: ServerProcess) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "modelserve.json").read_text())
    # Metric names only: drop label selectors {...} and grouping clauses by (...) first.
    exprs = [re.sub(r"\{[^}]*\}|by \([^)]*\)", "", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:gen_ai|modelserve|rpc)_[a-z_]+)\b", e)}
    with pytest.raises(grpc.RpcError):  # one rejected request, so the error series exist too
        list(stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(top_k=-1))))
    list(stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(max_new_tokens=3))))
    exported = {s.name for family in _scrape(llama_server).values() for s in family.samples}
    assert used and used <= exported, sorted(used - exported)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("tokens / s", "first token", "inter-token", "waiting", "kv cache", "errors"):
        assert topic in titles


@pytest.mark.parametrize("content", [False, True])
def test_request_span_tells_the_story_and_text_only_when_turned_on(content: bool) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from modelserve.engine.request import Finish, FinishReason, Request, SamplingParams, StreamEvent, Timings
    from modelserve.telemetry.request_outcome import OutcomeTracker

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("Generate"):
        request = Request("r", (5, 6, 7), SamplingParams(max_new_tokens=4))
        tracker = OutcomeTracker(None, request, "secret prompt" if content else None, trace_content=content)
        tracker.saw(StreamEvent("Hel", (1,), 1))
        finish = Finish(FinishReason.STOP_SEQUENCE, Timings(0.01, 0.02, 0.05), seed=1, mean_logprob=-2.0)
        tracker.saw(StreamEvent("lo", (2,), 2, finish=finish))
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["queued", "first_token", "admitted", "finished"]
    assert span.attributes is not None
    assert span.attributes["gen_ai.usage.input_tokens"] == 3 and span.attributes["gen_ai.usage.output_tokens"] == 2
    assert span.attributes["gen_ai.response.finish_reasons"] == ("stop_sequence",)
    if content:
        assert span.attributes["gen_ai.prompt"] == "secret prompt" and span.attributes["gen_ai.completion"] == "Hello"
    else:
        assert "gen_ai.prompt" not in span.attributes and "gen_ai.completion" not in span.attributes
    assert trace.get_current_span() is trace.INVALID_SPAN
