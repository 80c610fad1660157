"""Set OpenTelemetry up once for a server: resource, meters, tracer, exporters.

Configured by the standard variables: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES for the resource (service.name defaults to
"modelserve"); OTEL_EXPORTER_OTLP_ENDPOINT (or the _TRACES_/_METRICS_ forms)
turns on OTLP/gRPC export of traces and metrics, which OTEL_TRACES_EXPORTER or
OTEL_METRICS_EXPORTER = none turn off again; OTEL_TRACES_SAMPLER(_ARG) pick the
sampler. The Prometheus endpoint is on unless --metrics-port is 0. Each server
gets its own providers and Prometheus registry rather than the process-wide
globals, so several servers (or tests) in one process do not mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, start_http_server

from modelserve import __version__
from modelserve.telemetry.metrics import GenerationMetrics


@dataclass
class Telemetry:
    provider: MeterProvider
    meter: Meter
    metrics: GenerationMetrics
    tracer_provider: TracerProvider
    metrics_server: tuple[WSGIServer, object] | None = None  # (server, its thread)
    registry: CollectorRegistry | None = None  # what /metrics serves (None: no endpoint)

    def shutdown(self) -> None:
        """Flush what is pending to the exporters and stop the endpoint."""
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()
        self.tracer_provider.shutdown()
        self.provider.shutdown()


def _otlp_wanted(signal: str) -> bool:
    """OTLP export of `signal` (traces | metrics) is on when an endpoint is set and not turned off."""
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def start_telemetry(
    *,
    metrics_host: str = "0.0.0.0",
    metrics_port: int = 9464,
    extra_readers: tuple[MetricReader, ...] = (),
) -> Telemetry:
    """Meter provider with a Prometheus scrape endpoint on metrics_port (0 = none)."""
    attributes = {"service.version": __version__}
    if "OTEL_SERVICE_NAME" not in os.environ:
        attributes["service.name"] = "modelserve"
    resource = Resource.create(attributes)
    readers: list[MetricReader] = list(extra_readers)
    server = None
    registry: CollectorRegistry | None = None
    if metrics_port:
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        server = start_http_server(metrics_port, addr=metrics_host, registry=registry)
    if _otlp_wanted("metrics"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = provider.get_meter("modelserve", __version__)
    tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    if _otlp_wanted("traces"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Telemetry(provider, meter, GenerationMetrics(meter), tracer_provider, server, registry)
