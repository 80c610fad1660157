"""The engine as the server runs it: the frontend here, the engine core in a process of its own.

Two processes because the model's Python (most of a step on a GPU, and all of
it for a small model) and the gRPC event loop would otherwise take turns on one
GIL. The core is started with multiprocessing's spawn (a clean interpreter: no
copied CUDA state, no inherited threads) and talks over two ZeroMQ sockets on
ipc:// paths in a private temporary directory; see core_process.py for why
ZeroMQ and msgpack. It is spawned (core_spawn.py) before the frontend imports
the server, so their imports run side by side, and handed its spec after.

The core can die (an exception in its loop, kill -9, the kernel's OOM killer):
its process sentinel is watched on the event loop, so within milliseconds every
open request ends with "the engine core process died" and `wait_stopped()`
returns; the server then reports NOT_SERVING and exits non-zero, and its
orchestrator restarts it. Restarting the core in place was decided against: the
requests it held cannot be resumed without repeating or losing output.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import zmq
from tokenizers import Tokenizer

from modelserve.engine.admission import QueueLimits
from modelserve.engine.core_process import CoreSpec
from modelserve.engine.core_spawn import CoreProcess, CoreSockets
from modelserve.engine.frontend import EngineFrontend
from modelserve.engine.protocol import Command, CoreFailed, CoreReady, Shutdown, StepOutput
from modelserve.engine.request import StepRecord

log = logging.getLogger(__name__)


class CoreStartError(RuntimeError):
    """The engine core process could not load its model or died while starting."""


class ProcessEngine(EngineFrontend):
    """An EngineFrontend whose core runs in a child process."""

    def __init__(
        self,
        process: BaseProcess,
        ready: CoreReady,
        sockets: CoreSockets,
        tokenizer: Tokenizer,
        limits: QueueLimits,
        on_step: Callable[[StepRecord], None] | None,
    ) -> None:
        super().__init__(tokenizer, limits, ready.max_sequence_tokens, on_step)
        self.ready = ready
        self.weight_bytes = ready.weight_bytes  # as the in-process Engine has it
        self._process = process
        self._sockets = sockets
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        core: CoreProcess,
        spec_for: Callable[[str, str], CoreSpec],
        tokenizer: Tokenizer,
        limits_for: Callable[[int], QueueLimits],
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> ProcessEngine:
        """Hand `core` its spec and wait until its model is loaded (on failure, `core` is abandoned).
        `spec_for(commands, outputs)` builds the spec around the socket addresses; `limits_for(kv_budget_tokens)`
        the queue limits."""
        sockets, process = core.sockets, core.process
        core.hand(spec_for(sockets.commands_address, sockets.outputs_address))
        loop = asyncio.get_running_loop()
        died = loop.create_future()

        def on_exit() -> None:
            if not died.done():
                died.set_result(None)

        loop.add_reader(process.sentinel, on_exit)
        first = asyncio.ensure_future(sockets.receive())
        try:
            await asyncio.wait({first, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(process.sentinel)
        if not first.done():
            first.cancel()
            core.abandon()
            raise CoreStartError(f"the engine core process exited with code {process.exitcode} while starting")
        message = first.result()
        if not isinstance(message, CoreReady):
            core.abandon()
            error = message.error if isinstance(message, CoreFailed) else f"unexpected {type(message).__name__}"
            raise CoreStartError(error)
        engine = cls(process, message, sockets, tokenizer, limits_for(message.kv_budget_tokens), on_step)
        engine._reader = asyncio.ensure_future(engine._read())
        loop.add_reader(process.sentinel, engine._on_death)
        log.info(
            "engine core: process %d on %s (%s), weights %.1f MiB",
            process.pid,
            message.device,
            message.dtype,
            message.weight_bytes / 2**20,
        )
        return engine

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._send(Shutdown())
        self._process.join(timeout_s)
        if self._process.is_alive():
            log.warning("the engine core did not stop within %gs; killing it", timeout_s)
            self._process.kill()
            self._process.join(timeout_s)
        self._stop_watching()
        if not self._closed:
            self._core_stopped("the engine stopped")
        self._sockets.close()

    def _send(self, command: Command) -> None:
        if self._closed:
            return
        try:
            self._sockets.send(command)
        except zmq.ZMQError as exc:  # the core is gone; its death is reported through its sentinel
            log.debug("could not send %s to the engine core: %s", type(command).__name__, exc)

    async def _read(self) -> None:
        try:
            while True:
                message = await self._sockets.receive()
                if isinstance(message, StepOutput):
                    self._on_output(message)
        except asyncio.CancelledError:
            raise
        except Exception:  # a frame we cannot read: the two halves no longer agree, so stop the core
            log.exception("cannot read the engine core's output; stopping it")
            self._process.kill()

    def _on_death(self) -> None:
        self._stop_watching()
        self._process.join(5)  # its sentinel closes as it exits, a moment before it can be reaped
        code = self._process.exitcode
        if code not in (0, None):
            log.error("the engine core process died (exit code %s)", code)
        self._core_stopped(f"the engine core process ended (exit code {code})")

    def _stop_watching(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._process.sentinel)
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
