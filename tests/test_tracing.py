"""The tracing interceptor on a tiny in-process grpc.aio server (raw bytes, no model).

One SERVER span per RPC, under the caller's trace, current while the handler
runs, with the status the call ended with; a stream the caller cancels or
that runs out of time ends its span once and logs nothing at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from modelserve.telemetry.tracing import server_interceptor

SERVICE = "test.v1.Echo"
WAIT_S = 10.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

_Context = grpc.aio.ServicerContext[bytes, bytes]


class Echo:
    """Echo and Abort (unary; Abort aborts with the code named in the request); Count and Endless (streams)."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()
        self.stream_closed = asyncio.Event()

    async def echo(self, request: bytes, context: _Context) -> bytes:
        trace.get_current_span().add_event("handled")
        return request

    async def abort(self, request: bytes, context: _Context) -> bytes:
        await context.abort(grpc.StatusCode[request.decode()], "no thanks")

    async def count(self, request: bytes, context: _Context) -> AsyncIterator[bytes]:
        trace.get_current_span().add_event("counting")
        for i in range(int(request)):
            yield str(i).encode()

    async def endless(self, request: bytes, context: _Context) -> AsyncIterator[bytes]:
        trace.get_current_span().add_event("started")
        self.streaming.set()
        try:
            while True:  # never awaits: a cancel finds the stream waiting at `yield`, as a real one often is
                yield b"x" * 65536
        finally:
            trace.get_current_span().add_event("closed")  # cleanup still sees the RPC's span
            self.stream_closed.set()


class _OnEnd(SpanProcessor):
    def __init__(self, on_end: Callable[[ReadableSpan], None]) -> None:
        self._on_end = on_end

    def on_end(self, span: ReadableSpan) -> None:
        self._on_end(span)


class Served:
    def __init__(self) -> None:
        self.service = Echo()
        self.exporter = InMemorySpanExporter()
        self._ended: asyncio.Queue[ReadableSpan] = asyncio.Queue()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        provider.add_span_processor(_OnEnd(self._ended.put_nowait))
        self.server = grpc.aio.server(interceptors=[server_interceptor(provider)])
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.service.echo),
            "Abort": grpc.unary_unary_rpc_method_handler(self.service.abort),
            "Count": grpc.unary_stream_rpc_method_handler(self.service.count),
            "Endless": grpc.unary_stream_rpc_method_handler(self.service.endless),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self._stopped = False

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")

    def streaming(self, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self.channel.unary_stream(f"/{SERVICE}/{method}")

    async def next_span(self) -> ReadableSpan:
        """The next span the server ends, waiting for it."""
        return await asyncio.wait_for(self._ended.get(), WAIT_S)

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.channel.close()
            await self.server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = Served()
    await s.server.start()
    try:
        yield s
    finally:
        await s.stop()


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud]
    assert "Failed to detach context" not in caplog.text
    assert "Calling end() on an ended span" not in caplog.text


async def test_unary_call_makes_one_ok_span_with_the_rpc_attributes(served: Served) -> None:
    assert await served.unary("Echo")(b"hi") == b"hi"
    span = await served.next_span()
    assert span.name == f"/{SERVICE}/Echo" and span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET  # OK: the conventions leave a success unset
    attrs = _attrs(span)
    assert {k: attrs[k] for k in ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")} == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Echo",
        "rpc.grpc.status_code": grpc.StatusCode.OK.value[0],
    }
    assert attrs["net.peer.ip"] == "127.0.0.1" and isinstance(attrs["net.peer.port"], int)
    assert span.parent is None
    await served.stop()
    assert len(served.exporter.get_finished_spans()) == 1


async def test_the_callers_traceparent_becomes_the_parent(served: Served) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    await served.unary("Echo")(b"hi", metadata=(("traceparent", traceparent),))
    span = await served.next_span()
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent.span_id == int(PARENT_ID, 16) and span.parent.is_remote


async def test_the_rpc_span_is_current_inside_the_handler(served: Served) -> None:
    await served.unary("Echo")(b"hi")
    span = await served.next_span()
    assert [e.name for e in span.events] == ["handled"]
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing leaks into the caller's context


async def test_a_stream_that_runs_to_its_end_makes_one_ok_span(served: Served) -> None:
    assert [m async for m in served.streaming("Count")(b"3")] == [b"0", b"1", b"2"]
    span = await served.next_span()
    assert span.name == f"/{SERVICE}/Count" and span.kind is SpanKind.SERVER
    assert _attrs(span)["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events] == ["counting"]  # the span is current inside a stream too


@pytest.mark.parametrize(
    ("code", "status"),
    [(grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET), (grpc.StatusCode.UNAVAILABLE, StatusCode.ERROR)],
)
async def test_an_abort_records_its_code(served: Served, code: grpc.StatusCode, status: StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.unary("Abort")(code.name.encode())
    assert caught.value.code() is code
    span = await served.next_span()
    assert _attrs(span)["rpc.grpc.status_code"] == code.value[0]
    assert span.status.status_code is status  # only server-side faults are errors
    if status is StatusCode.ERROR:
        assert span.status.description == f"{code.name}: no thanks"


async def test_a_stream_the_client_cancels_ends_its_span_once_and_quietly(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    call = served.streaming("Endless")(b"")
    await call.read()
    await asyncio.wait_for(served.service.streaming.wait(), WAIT_S)
    call.cancel()
    span = await served.next_span()
    assert served.service.stream_closed.is_set()
    assert _attrs(span)["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.status.status_code is StatusCode.UNSET  # the caller's choice, not a server fault
    assert [e.name for e in span.events] == ["started", "closed"]
    await served.stop()
    assert len(served.exporter.get_finished_spans()) == 1
    _assert_quiet(caplog)


async def test_a_deadline_that_passes_mid_stream_ends_its_span_once_and_quietly(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    call = served.streaming("Endless")(b"", timeout=1.0)
    await call.read()  # the stream is running; the client reads no more, so the server waits at `yield`
    assert await asyncio.wait_for(call.code(), WAIT_S) is grpc.StatusCode.DEADLINE_EXCEEDED
    span = await served.next_span()
    assert _attrs(span)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None and span.status.description.startswith("DEADLINE_EXCEEDED")
    assert [e.name for e in span.events] == ["started", "closed"]
    await served.stop()
    assert len(served.exporter.get_finished_spans()) == 1
    _assert_quiet(caplog)
