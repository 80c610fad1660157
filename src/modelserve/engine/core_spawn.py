"""Spawning the engine core's process first thing, before the frontend imports the server, torch or
transformers: the two processes' imports (several seconds each, most of a server's start-up) then run side
by side. So this module imports nothing heavy itself (no torch), and the frontend takes the process over
once it has read the model (ProcessEngine.start in client.py hands it its spec).
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile

import msgspec
import zmq
import zmq.asyncio

from modelserve.engine.core_process import CoreSpec, main
from modelserve.engine.cpu_threads import passive_omp_waits
from modelserve.engine.protocol import Command, CoreMessage


class CoreProcess:
    """The engine core's process, spawned early: it imports while the frontend imports and reads the model,
    then waits for its spec (ProcessEngine.start hands it over). `abandon()` ends one that never got it, and
    does nothing more once the engine has stopped it."""

    def __init__(self) -> None:
        self.sockets = CoreSockets()
        context = multiprocessing.get_context("spawn")
        specs, self._specs = context.Pipe(duplex=False)
        self.process = context.Process(target=main, args=(specs,), name="modelserve-engine-core", daemon=True)
        with passive_omp_waits():
            self.process.start()
        specs.close()  # the child's end: ours closing is what tells it to give up
        self._handed = self._abandoned = False

    def hand(self, spec: CoreSpec) -> None:
        self._specs.send(spec)
        self._specs.close()
        self._handed = True

    def abandon(self) -> None:
        """Stop the process and close the sockets; idempotent. One that has no spec yet holds nothing and is
        killed at once (it may still be importing, which would only delay the exit); one that has its spec
        gets a moment to end (it ends on its own after it reported a failure)."""
        if self._abandoned:
            return
        self._abandoned = True
        self._specs.close()
        if not self._handed:
            self.process.kill()
        if self.process.is_alive():
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self.sockets.close()


class CoreSockets:
    """The frontend's two ZeroMQ sockets, bound on ipc:// paths in a private temporary directory."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="modelserve-")
        self.commands_address = f"ipc://{self._dir}/commands"
        self.outputs_address = f"ipc://{self._dir}/outputs"
        self._sync = zmq.Context()
        self._async = zmq.asyncio.Context()
        self._commands = self._sync.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # commands are bounded by admission, never dropped
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(self.commands_address)
        self._outputs = self._async.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.LINGER, 0)
        self._outputs.bind(self.outputs_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._closed = False

    def send(self, command: Command) -> None:
        self._commands.send(self._encoder.encode(command), zmq.NOBLOCK)

    async def receive(self) -> CoreMessage:
        frame = await self._outputs.recv()
        message: CoreMessage = self._decoder.decode(frame)
        return message

    def close(self) -> None:
        """Close both sockets and remove their directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._commands.close()
        self._outputs.close()
        self._sync.term()
        self._async.term()
        shutil.rmtree(self._dir, ignore_errors=True)
