"""A SERVER span per RPC that continues the caller's W3C trace context.

Hand-written because opentelemetry-instrumentation-grpc's aio interceptor
mishandles cancelled streams: it wraps a stream in an async generator that keeps
its context attached across each `yield`, so a call cancelled while the stream
waits at a `yield` (client cancel, disconnect, deadline) has that generator
closed later by asyncio's finalizer in another task, where the detach logs two
"Failed to detach context" tracebacks at ERROR (and its span said OK).

Here each handler runs as one coroutine in the call's own task, with the span
attached and detached in that task. A streaming handler's messages are written
by us with context.write(), not by grpc, so its generator is closed in that task
too, under its span, however the call ends, and the span is ended exactly once.
Writing ourselves also lets a write that fails because the call is already over
count as the cancel it is: grpc raises ExecuteBatchError there, and when that
beats the cancel notice (a deadline that passes while the server waits on a slow
reader does, every time) grpc itself logs it at ERROR.

Span status follows the OpenTelemetry gRPC conventions for servers: only
UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS
are errors (status ERROR with the code and details); other codes leave the
status UNSET. So a caller's cancel or disconnect records
rpc.grpc.status_code=1 (CANCELLED) with status UNSET, and a deadline that passes
records 4 (DEADLINE_EXCEEDED) with status ERROR; neither writes a log line.
Attributes are those the instrumentation set: rpc.system, rpc.service,
rpc.method, rpc.grpc.status_code, net.peer.ip/port and rpc.user_agent.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from modelserve import __version__
from modelserve.telemetry.call_status import ended_early_code, wrapped_handler

# Server-side gRPC codes the OpenTelemetry conventions count as errors.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_Context = grpc.aio.ServicerContext[Any, Any]


def server_interceptor(tracer_provider: TracerProvider | None = None) -> grpc.aio.ServerInterceptor:
    """The tracing interceptor; put it first (outermost) so the span covers the others."""
    return _TracingInterceptor(trace.get_tracer(__name__, __version__, tracer_provider))


class _TracingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        return await wrapped_handler(continuation, details, self._wrap)

    def _wrap(self, behavior: Callable[..., Any], method: str, streams: bool) -> Callable[..., Any]:
        async def traced(request: Any, context: _Context) -> Any:
            span, active = self._start(method, context)
            error: BaseException | None = None
            token = otel_context.attach(active)
            try:
                if not streams:
                    return await behavior(request, context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    await _write_all(result, context)
                else:
                    await result  # a handler that writes with context.write() itself
                return None
            except BaseException as exc:
                error = exc
                raise
            finally:
                otel_context.detach(token)
                _end(span, context, error)

        return traced

    def _start(self, method: str, context: _Context) -> tuple[Span, otel_context.Context]:
        """Start the span under the caller's trace; return it and the context that makes it current."""
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        parent = extract(metadata)
        service, _, name = method.lstrip("/").partition("/")
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            **_peer(context.peer()),
        }
        if "user-agent" in metadata:
            attributes["rpc.user_agent"] = metadata["user-agent"]
        span = self._tracer.start_span(method, parent, kind=SpanKind.SERVER, attributes=attributes)
        return span, trace.set_span_in_context(span, parent)


async def _write_all(messages: AsyncGenerator[Any, Any], context: _Context) -> None:
    """Send what a streaming handler yields, as grpc would; close it here, in this task, however the call ends."""
    try:
        async for message in messages:
            try:
                await context.write(message)
            except grpc.aio.InternalError as exc:  # grpc's ExecuteBatchError: the call is over (cancel, deadline)
                raise asyncio.CancelledError(f"the call ended before a message could be sent: {exc}") from exc
    finally:
        await messages.aclose()  # a no-op if it finished; else its cleanup runs now, under its span


def _end(span: Span, context: _Context, error: BaseException | None) -> None:
    code, details = _outcome(context, error)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))
    if error is not None and code is grpc.StatusCode.UNKNOWN:
        span.record_exception(error)
    span.end()


def _outcome(context: _Context, error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status the call ended with, and its details."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away, or time ran out
        if ended_early_code(context) is grpc.StatusCode.DEADLINE_EXCEEDED:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call ended"
        return grpc.StatusCode.CANCELLED, "the call was cancelled before it ended"
    code = context.code()  # set by context.abort() or context.set_code(); None if neither ran
    if isinstance(code, grpc.StatusCode):
        return code, context.details() or ""
    if error is None:
        return grpc.StatusCode.OK, ""
    return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"


def _peer(peer: str) -> dict[str, str | int]:
    """'ipv4:127.0.0.1:5123' or 'ipv6:%5B::1%5D:5123' → net.peer.ip and net.peer.port; else nothing."""
    family, _, address = peer.partition(":")
    host, _, port = unquote(address.split(",")[0]).rpartition(":")
    if family not in ("ipv4", "ipv6") or not host or not port.isdigit():
        return {}
    return {"net.peer.ip": host.strip("[]"), "net.peer.port": int(port)}
