"""How a gRPC call that ended early ended: its deadline passed, or its caller went away.

One answer for the tracing span, the RPC metrics and the servicer's finish
reason, so the three never disagree about the same call.
"""

from __future__ import annotations

from typing import Any

import grpc

# The caller's deadline passes a moment before ours (it started earlier), and its cancel can reach us
# first: a call cancelled this close to its deadline is counted as past it.
DEADLINE_SLACK_S = 0.1


def ended_early_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has (about) passed, else CANCELLED."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
