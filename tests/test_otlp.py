"""A real OTLP/gRPC export: the server sends spans and metrics to a receiver started here,
and a trace started by the client continues on the server."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import ServerProcess, free_port, start_server

WAIT_S = 60.0


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps what arrives; `wait_for` blocks until a predicate holds (an event, not a poll)."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, Any]] = []  # (resource, span)
        self.metric_names: set[str] = set()
        self._changed = threading.Condition()

    def Export(self, request: Any, context: Any) -> Any:
        with self._changed:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    self.spans.extend((rs.resource, s) for ss in rs.scope_spans for s in ss.spans)
                response: Any = trace_service_pb2.ExportTraceServiceResponse()
            else:
                for rm in request.resource_metrics:
                    self.metric_names.update(m.name for sm in rm.scope_metrics for m in sm.metrics)
                response = metrics_service_pb2.ExportMetricsServiceResponse()
            self._changed.notify_all()
        return response

    def wait_for(self, predicate: Any) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout=WAIT_S)


@pytest.fixture()
def otlp(model_dirs: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Receiver, ServerProcess]]:
    receiver = Receiver()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, grpc_server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, grpc_server)
    port = free_port()
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "modelserve-otlp-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    server = start_server(tmp_path, "--model", str(model_dirs["llama"]), env=env)
    try:
        server.wait_serving()
        yield receiver, server
    finally:
        server.terminate()
        grpc_server.stop(None)


def test_spans_and_metrics_arrive_and_the_client_trace_continues(otlp: tuple[Receiver, ServerProcess]) -> None:
    receiver, server = otlp
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        params = pb.GenerationParameters(max_new_tokens=4, ignore_eos=True)  # sampled: EOS could end it sooner
        request = pb.GenerateRequest(prompt="Hello", params=params)
        messages = list(stub.Generate(request, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")]))
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH

    def ours() -> list[tuple[Any, Any]]:
        return [(r, s) for r, s in receiver.spans if s.trace_id.hex() == trace_id]

    assert receiver.wait_for(lambda: ours()), f"no span of trace {trace_id} arrived; log:\n{server.log()}"
    resource, span = ours()[0]
    assert span.parent_span_id.hex() == parent_id  # the server's span is a child of the client's
    assert "Generate" in span.name
    assert [e.name for e in span.events] == ["queued", "first_token", "admitted", "finished"]
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["gen_ai.usage.output_tokens"].int_value == 4
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == ["length"]
    assert not any("prompt" in key or "text" in key for key in attrs)  # no content unless turned on
    service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
    assert service == "modelserve-otlp-test"

    wanted = {"gen_ai.server.request.duration", "gen_ai.server.time_to_first_token", "rpc.server.call.duration"}
    assert receiver.wait_for(lambda: wanted <= receiver.metric_names), receiver.metric_names
