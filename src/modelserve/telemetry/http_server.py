"""A SERVER span and http.server.request.duration for every HTTP request, as the OpenTelemetry HTTP
conventions name them: the HTTP app's counterpart of the gRPC tracing and RPC-metrics interceptors.

Hand-written, as those are (opentelemetry-instrumentation-asgi would be one more dependency for a few
lines). A plain ASGI middleware: the span continues the caller's W3C trace context from the headers and
is current for the whole request, so the request's own telemetry (request_outcome.py) lands on it, in
the request's own task. A streamed response is measured to its last byte. Span status follows the
conventions for servers: ERROR for a 5xx answer or an exception, UNSET otherwise (a 4xx is the
caller's).
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelserve import __version__

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before the answer

HTTP_DURATION_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]


class HttpTelemetryMiddleware:
    def __init__(self, app: ASGIApp, tracer_provider: TracerProvider, meter: Meter) -> None:
        self._app = app
        self._tracer = trace.get_tracer(__name__, __version__, tracer_provider)
        self._duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of an HTTP request on the server; a streamed response's whole life",
            explicit_bucket_boundaries_advisory=HTTP_DURATION_BUCKETS_S,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        parent = extract(headers)
        method = scope["method"]
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": scope["path"]}
        attributes["url.scheme"] = scope.get("scheme", "http")
        if scope.get("client"):
            attributes["client.address"] = scope["client"][0]
        if "user-agent" in headers:
            attributes["user_agent.original"] = headers["user-agent"]
        span = self._tracer.start_span(method, parent, kind=SpanKind.SERVER, attributes=attributes)
        status: int | None = None  # none: the app ended without answering, as when the client went away

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        error: BaseException | None = None
        try:
            await self._app(scope, receive, send_observed)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            route = getattr(scope.get("route"), "path", None)  # the matched route's template, set by the router
            if status is None:
                # Raised before answering: the caller sees a 500. Ended without answering: the client left
                # (nginx's 499), normal caller behaviour and not a server error.
                status = 500 if error is not None else CLIENT_CLOSED_REQUEST
            metric_attrs: dict[str, Any] = {"http.request.method": method, "http.response.status_code": status}
            if route is not None:
                metric_attrs["http.route"] = route
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500 or error is not None:
                error_type = type(error).__qualname__ if error is not None else str(status)
                metric_attrs["error.type"] = error_type
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
            self._duration.record(time.perf_counter() - start, metric_attrs)
            span.end()
