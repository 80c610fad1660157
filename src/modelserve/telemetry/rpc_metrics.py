"""rpc.server.call.duration for every RPC, as the OpenTelemetry RPC conventions name it.

Hand-written: the tracing interceptor (tracing.py) makes spans only, and
grpcio-observability does not support grpc.aio. A stream is measured from its
start to its last message, with the status it ended with.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry.metrics import Meter

from modelserve.telemetry.call_status import ended_early_code, wrapped_handler

RPC_DURATION_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, meter: Meter) -> None:
        self._duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of an RPC on the server; a stream's whole life",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS_S,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        return await wrapped_handler(continuation, details, self._measured)

    def _measured(self, behavior: Callable[..., Any], method: str, streams: bool) -> Callable[..., Any]:
        method = method.lstrip("/")
        timed = self._timed

        if streams:

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                with timed(method, context):
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for message in result:
                            yield message
                    else:
                        await result  # a handler that writes with context.write()

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with timed(method, context):
                return await behavior(request, context)

        return unary

    @contextlib.contextmanager
    def _timed(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
        """Record the call's duration and the status it ended with."""
        start, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
        try:
            yield
            code = grpc.StatusCode.OK
        except BaseException as exc:
            code = _status_of(exc, context)
            raise
        finally:
            self._record(method, code, context, time.perf_counter() - start)

    def _record(
        self, method: str, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any], seconds: float
    ) -> None:
        set_code = context.code()
        if isinstance(set_code, grpc.StatusCode):
            code = set_code
        attrs = {"rpc.system.name": "grpc", "rpc.method": method, "rpc.status_code": code.name}
        if code is not grpc.StatusCode.OK:
            attrs["error.type"] = code.name
        self._duration.record(seconds, attrs)


def _status_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    # A stream closed while it waits at a yield sees GeneratorExit: its caller went away, or time ran out.
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return ended_early_code(context)
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
