"""Ending a server process once it has closed what it owns, without tearing its interpreter down.

By then the gRPC and HTTP ports are closed, the engine core has exited, telemetry is flushed and the
sockets are closed. What is left of a normal exit is the interpreter's teardown of torch's, transformers'
and gRPC's modules, which took about a second per process here (each of the frontend, the engine core and
every tensor-parallel rank): time a rolling restart and Kubernetes' termination wait on, and nothing else
needs. So the log and the standard streams are flushed and the process ends at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush the log and the standard streams, then end the process with `code`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            stream.flush()
    os._exit(code)
