"""The engine-core process: load the weights, then take commands, step and send, until told to stop.

It is spawned before the frontend has read the model directory, and imports torch, transformers
and the engine (seconds) while the frontend does (seconds too, on the other CPU); then it waits on a
pipe for its spec. A frontend that gives up first (a bad model, a stop while loading) closes the pipe,
and the process ends without a word.

ZeroMQ sockets (as vLLM's engine core uses) with msgpack through msgspec: ZeroMQ
does its socket I/O on its own C++ threads, so sending a step's output never
stalls the next step, and msgspec encodes a step in microseconds. The process
ignores SIGINT and SIGTERM (the frontend drains, then tells it to stop) and
exits when its parent is gone, so it is never left holding a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import msgspec
import zmq

from modelserve.config import LOG_FORMAT
from modelserve.engine.cpu_threads import SPIN_COUNT, WAIT_POLICY, core_threads
from modelserve.engine.protocol import Command, CoreFailed, CoreReady, StepOutput
from modelserve.gc_heap import freeze_startup_heap
from modelserve.process_exit import exit_now

if TYPE_CHECKING:
    import torch

    from modelserve.engine.core import EngineCore
    from modelserve.engine.engine import EngineConfig
    from modelserve.engine.runner import ModelRunner
    from modelserve.engine.tensor_parallel import Ranks, TensorParallel
    from modelserve.models.loader import LoadedModel, ModelInfo

log = logging.getLogger("modelserve.engine")

PARENT_CHECK_MS = 1000  # how often an idle core checks that its frontend is still there


@dataclass(frozen=True)
class CoreSpec:
    """What the core process needs to start: where the model is and how to run it."""

    model: ModelInfo  # as the frontend read it: where the weights are, EOS ids, context length
    device: str
    dtype: str
    quantization: str  # Config.quantization: none | int8
    trust_remote_code: bool
    engine: EngineConfig
    observed: bool  # telemetry reads step timings and the confidence signal
    commands_address: str  # the frontend's PUSH socket, bound
    outputs_address: str  # the frontend's PULL socket, bound
    log_level: str


def main(specs: Connection) -> None:
    """The process's entry point (multiprocessing, spawn): the CoreSpec comes on `specs`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from modelserve.engine.core_loop import run_core_loop  # torch and the engine: the slow imports
    from modelserve.models import loader  # noqa: F401  (transformers, which _build_core uses)

    try:
        spec: CoreSpec = specs.recv()
    except EOFError:  # the frontend gave up before it had read the model
        return
    finally:
        specs.close()
    logging.basicConfig(level=spec.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    parent = os.getppid()
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(spec.commands_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 5000)
    outputs.connect(spec.outputs_address)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Command)

    try:
        loaded, core, ranks = _build_core(spec)
    except Exception as exc:
        outputs.send(encoder.encode(CoreFailed(" ".join(str(exc).split()) or type(exc).__name__)))
        outputs.close()
        context.term()
        return
    freeze_startup_heap("engine core")
    outputs.send(
        encoder.encode(
            CoreReady(
                vocab_size=loaded.vocab_size,
                max_sequence_tokens=core.max_sequence_tokens,
                kv_budget_tokens=core.kv_budget_tokens,
                device=str(core.runner.device),
                dtype=str(core.runner.kv_shape.dtype).removeprefix("torch."),
                weight_bytes=_weight_bytes(core),
            )
        )
    )

    def take(block: bool) -> list[Command]:
        received: list[Command] = []
        while True:
            if not commands.poll(PARENT_CHECK_MS if block and not received else 0):
                if not received and os.getppid() != parent:  # also while the idle core fills KV memory
                    log.warning("the frontend process is gone; the engine core stops")
                    sys.exit(1)
                return received
            received.append(decoder.decode(commands.recv()))

    def emit(out: StepOutput) -> None:
        outputs.send(encoder.encode(out), copy=False)

    run_core_loop(core, take, emit)  # an exception here ends the process non-zero: the frontend sees it die
    if ranks is not None:
        ranks.stop()
    outputs.close()
    commands.close()
    context.term()
    exit_now(0)


def _build_core(spec: CoreSpec) -> tuple[LoadedModel, EngineCore, Ranks | None]:
    """The model, loaded (rank 0's shard of it when tensor-parallel, the other ranks started first), and the
    engine core over it."""
    from modelserve.engine.self_check import check_greedy_matches_generate
    from modelserve.engine.tensor_parallel import Ranks
    from modelserve.models.capability import FAMILIES

    world = spec.engine.tensor_parallel_size
    ranks = tp = None
    if world > 1:
        if spec.quantization != "none":
            raise ValueError(f"--quantization {spec.quantization} does not combine with --tensor-parallel-size")
        address = f"127.0.0.1:{_free_port()}"
        ranks = Ranks(spec, world, address, _rank_device(spec, 0))
        tp = ranks.tp
    loaded = _load(spec, 0, world)
    core = spec.engine.build_core(
        loaded.model, loaded.eos_token_ids, loaded.max_sequence_length, spec.observed, loaded.tokenizer, tp
    )
    if ranks is not None:
        pids = [p.pid for p in ranks.processes]
        log.info("tensor parallel: %d ranks, rank 0 in this process, ranks 1.. in processes %s", world, pids)
    if loaded.model_type not in FAMILIES:
        seconds = check_greedy_matches_generate(core, loaded.architecture)
        log.info(
            "%s (%s) is not among the families the tests check; its greedy self-check against generate() "
            "passed in %.2f s",
            loaded.architecture,
            loaded.model_type,
            seconds,
        )
    return loaded, core, ranks


def _weight_bytes(core: EngineCore) -> int:
    """The model's weights on its devices, after the runner packed its linears: every rank's, summed."""
    from modelserve.models.quantize import weight_bytes

    own = weight_bytes(core.runner.model)
    tp = core.runner.tp
    return tp.sum_int(own, core.runner.device) if tp is not None else own


def load_rank(spec: CoreSpec, rank: int, world: int, address: str) -> tuple[ModelRunner, TensorParallel]:
    """A rank other than 0 (tensor_parallel.main): join the ranks, load the model, keep this rank's shard."""
    from modelserve.engine.runner import ModelRunner
    from modelserve.engine.tensor_parallel import connect

    tp = connect(rank, world, address, _rank_device(spec, rank))
    loaded = _load(spec, rank, world)
    runner = ModelRunner(loaded.model, frozenset(loaded.eos_token_ids), loaded.max_sequence_length, True, None, tp)
    return runner, tp


def _rank_device(spec: CoreSpec, rank: int) -> torch.device:
    from modelserve.engine.tensor_parallel import rank_device
    from modelserve.models.loader import resolve_device

    return rank_device(resolve_device(spec.device), rank)


def _load(spec: CoreSpec, rank: int, world: int) -> LoadedModel:
    """The weights on this rank's device (its shard of them when tensor-parallel, cut before they go there),
    with torch's threads set for it (the CPU's share of each rank)."""
    import torch

    from modelserve.engine.tensor_parallel import shard
    from modelserve.models.loader import load_weights_on

    loaded = load_weights_on(
        spec.model,
        str(_rank_device(spec, rank)),
        spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        quantization=spec.quantization,
        before_placing=(
            functools.partial(shard, rank=rank, world=world, own_forward=spec.engine.own_forward) if world > 1 else None
        ),
    )
    threads = core_threads(
        on_cpu=loaded.device.type == "cpu",
        parameters=sum(p.numel() for p in loaded.model.parameters()),
        torch_threads=torch.get_num_threads(),
    )
    share = max(1, threads.threads // world) if loaded.device.type == "cpu" else threads.threads
    torch.set_num_threads(share)
    log.info(
        "engine core%s: torch threads %d (%s%s); %s=%s, %s=%s",
        f" rank {rank}" if world > 1 else "",
        share,
        threads.reason,
        f", shared by {world} ranks" if world > 1 and loaded.device.type == "cpu" else "",
        WAIT_POLICY,
        os.environ.get(WAIT_POLICY, "unset"),
        SPIN_COUNT,
        os.environ.get(SPIN_COUNT, "unset"),
    )
    return loaded


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
