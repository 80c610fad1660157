"""Request parsing that answers INVALID_ARGUMENT: bytes that are not the method's message.

grpc.aio parses a request before any handler runs and answers a parse failure
with UNKNOWN (and logs a traceback). This interceptor takes the parsing over for
every method with a single request message (ours, health, reflection's requests
are streams and keep grpc's own parsing): it hands the handler grpc's raw bytes
and parses them itself, so a malformed request gets INVALID_ARGUMENT with a
message saying so. grpc has no hook for this, hence the few lines by hand.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class RequestParsingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, str(details.method)
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return parse(raw)
            except Exception as exc:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the request to {method} is not a valid message: {exc}"
                )

        if handler.response_streaming:

            async def stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                result = behavior(await parsed(raw, context), context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        yield message
                else:
                    await result  # a handler that writes with context.write()

            return handler._replace(unary_stream=stream, request_deserializer=None)

        async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(await parsed(raw, context), context)

        return handler._replace(unary_unary=unary, request_deserializer=None)
