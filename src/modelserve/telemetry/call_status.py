"""What the telemetry interceptors share about a gRPC call: how to wrap its handler, and how a
call that ended early ended (its deadline passed, or its caller went away).

One answer for the tracing span, the RPC metrics and the servicer's finish
reason, so the three never disagree about the same call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# wrap(behavior, method, streams) -> the behavior to run instead
Wrap = Callable[[Callable[..., Any], str, bool], Callable[..., Any]]

# The caller's deadline passes a moment before ours (its clock started when it sent the call, ours when we
# read it), and its cancel can reach us first: a call cancelled this close to its deadline is counted as
# past it. The moment is the call's wait to be read, which a loaded server can stretch past 100 ms.
DEADLINE_SLACK_S = 0.5


def ended_early_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has (about) passed, else CANCELLED."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def wrapped_handler(
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails, wrap: Wrap
) -> Any:
    """The call's RpcMethodHandler with its one behavior (unary or streaming response) replaced by `wrap`'s."""
    handler = await continuation(details)  # an RpcMethodHandler namedtuple, or None
    if handler is None:
        return None
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return handler._replace(**{kind: wrap(behavior, str(details.method), kind.endswith("stream"))})
    return handler
