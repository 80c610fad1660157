"""Set OpenTelemetry up once for a server: resource, meter provider, Prometheus endpoint.

The resource honours the standard variables (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES); the service name defaults to "modelserve". Each
server gets its own MeterProvider and Prometheus registry rather than the
process-wide globals, so several servers (or tests) in one process do not mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server

from modelserve import __version__
from modelserve.telemetry.metrics import GenerationMetrics


@dataclass
class Telemetry:
    provider: MeterProvider
    meter: Meter
    metrics: GenerationMetrics
    metrics_server: tuple[WSGIServer, object] | None = None  # (server, its thread)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()
        self.provider.shutdown()


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
    if metrics_port:
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        server = start_http_server(metrics_port, addr=metrics_host, registry=registry)
    provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = provider.get_meter("modelserve", __version__)
    return Telemetry(provider, meter, GenerationMetrics(meter), server)
