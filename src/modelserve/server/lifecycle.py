"""A server's life around its engine: load the model, build and warm up the engine, drain it.

Kept apart from the gRPC wiring (app.py) so that the benchmarks build their engine
with the same `build_engine` the server uses, from the same Config.

The drain is the part with a contract. From the moment SIGTERM arrives, the gRPC
server stays open and every new call, on a new or an already-open connection,
reaches the servicer, which answers UNAVAILABLE ("retry on another replica").
Only when the running calls have ended (or the grace period is over and the
engine has ended the rest with a last message), and no call has been refused for
QUIET_S, is the gRPC server stopped.
Stopping it at once instead would leave a window in which a call that reaches
an open connection is killed by the transport as CANCELLED, which no retry
policy retries. The HTTP port (openai/app.py) drains the same way: 503 for new
requests on open connections, running ones counted with the gRPC calls, and
the port closed with the gRPC server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from modelserve.config import Config

if TYPE_CHECKING:
    import grpc

    from modelserve.engine.client import ProcessEngine
    from modelserve.engine.core_spawn import CoreProcess
    from modelserve.engine.engine import Engine
    from modelserve.engine.frontend import EngineFrontend
    from modelserve.engine.request import StepRecord
    from modelserve.models.loader import LoadedModel, ModelInfo
    from modelserve.server.core.serving import Serving
    from modelserve.server.openai.app import HttpServer

log = logging.getLogger("modelserve")

T = TypeVar("T")
# After the grace period the engine ends the remaining requests; their handlers need a moment to send
# the last message and status before the gRPC server is stopped.
FINAL_MESSAGE_S = 5.0
# What the gRPC server's own stop waits for calls the drain does not count (health Watch streams).
STOP_GRACE_S = 1.0
# Before the ports close, the drain waits until no call has been refused for QUIET_S (at most LINGER_S):
# a client still sending on an open connection (a router's in-flight burst) gets UNAVAILABLE, which its
# retry policy retries elsewhere, not the CANCELLED a stopping transport gives a call it finds in flight.
QUIET_S = 0.5
LINGER_S = 5.0


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run blocking work off the loop in a thread that never holds up process exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(fn_result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(fn_result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="modelserve-load", daemon=True).start()
    return await future


def load_info(config: Config) -> ModelInfo:
    """The configured model's tokenizer and description (building the demo model first if need be), with
    the chat template of --chat-template if given; its weights are the engine core's to load."""
    import torch

    from modelserve.models.demo import DEMO_MODEL_ID, demo_model_dir
    from modelserve.models.loader import load_model_info
    from modelserve.server.core.chat import with_chat_template

    # Placeholders until the core says which device and dtype it chose (it alone touches the GPU).
    device, dtype = torch.device("cpu"), torch.float32
    if config.model is None:
        log.warning(
            "no --model given: serving the embedded DEMO model (random weights, so its text is random). "
            "Pass --model PATH to serve a real Hugging Face model."
        )
        path = demo_model_dir(config.cache_dir)
        info = load_model_info(
            str(path),
            device,
            dtype,
            model_id=config.served_model_name or DEMO_MODEL_ID,
            revision=config.revision or None,
            max_model_len=config.max_model_len,
            is_demo=True,
        )
    else:
        info = load_model_info(
            config.model,
            device,
            dtype,
            model_id=config.served_model_name or None,
            revision=config.revision or None,
            max_model_len=config.max_model_len,
            trust_remote_code=config.trust_remote_code,
        )
    return with_chat_template(info, config.chat_template)


def load(config: Config) -> LoadedModel:
    """The configured model with its weights, in this process (the benchmark's in-process engine)."""
    from modelserve.models.loader import load_weights_on

    return load_weights_on(
        load_info(config),
        config.device,
        config.dtype,
        trust_remote_code=config.trust_remote_code,
        quantization=config.quantization,
    )


def build_engine(config: Config, model: LoadedModel, on_step: Callable[[StepRecord], None] | None = None) -> Engine:
    """The in-process engine for `model` with the limits of `config` (built, not started)."""
    from modelserve.engine.engine import Engine, EngineConfig

    return Engine(
        model.model,
        model.tokenizer,
        model.eos_token_ids,
        EngineConfig.from_config(config),
        model.max_sequence_length,
        on_step=on_step,
    )


async def start_engine_core(
    core: CoreProcess, config: Config, info: ModelInfo, on_step: Callable[[StepRecord], None] | None = None
) -> tuple[ProcessEngine, ModelInfo]:
    """Start the spawned engine core process on `info`'s model; return the engine and the info as the core
    runs it."""
    import torch

    from modelserve.engine.client import ProcessEngine
    from modelserve.engine.core_process import CoreSpec
    from modelserve.engine.engine import EngineConfig

    engine_config = EngineConfig.from_config(config)

    def spec_for(commands_address: str, outputs_address: str) -> CoreSpec:
        return CoreSpec(
            model=info,
            device=config.device,
            dtype=config.dtype,
            quantization=config.quantization,
            trust_remote_code=config.trust_remote_code,
            engine=engine_config,
            observed=on_step is not None,
            commands_address=commands_address,
            outputs_address=outputs_address,
            log_level=config.log_level,
        )

    engine = await ProcessEngine.start(core, spec_for, info.tokenizer, engine_config.queue_limits, on_step)
    ready = engine.ready
    info = dataclasses.replace(
        info,
        device=torch.device(ready.device),
        dtype=getattr(torch, ready.dtype),
        vocab_size=ready.vocab_size,
        weight_bytes=ready.weight_bytes,
    )
    return engine, info


async def warm_up(engine: EngineFrontend, model: ModelInfo) -> None:
    """One short greedy generation through the whole path before we say SERVING."""
    from modelserve.engine.request import Request, SamplingParams

    prompt = tuple(model.encode("Hello")) or (model.eos_token_ids[0],)
    stream = engine.submit(Request("warm-up", prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    async for event in stream:
        if event.finish is not None and event.finish.error:
            raise RuntimeError(f"warm-up generation failed: {event.finish.error}")


async def drain(
    server: grpc.aio.Server,
    http: HttpServer | None,
    serving: Serving,
    engine: EngineFrontend | None,
    grace_s: float,
) -> None:
    """With every face already refusing new calls: let running calls finish for `grace_s`, end the
    rest with a last message, then stop the gRPC server and the HTTP port."""
    if engine is not None and not await serving.wait_idle(grace_s):
        from modelserve.engine.request import FinishReason

        stats = engine.stats()
        log.warning("grace period over: ending %d running and %d waiting requests", stats.running, stats.waiting)
        engine.abort_all(
            FinishReason.CANCELLED,
            f"the server is shutting down and its {grace_s:g}s grace period is over; retry on another replica",
        )
        if not await serving.wait_idle(FINAL_MESSAGE_S):
            log.warning(
                "some calls did not end within %gs of the grace period; the server cancels them", FINAL_MESSAGE_S
            )
    await serving.wait_quiet(QUIET_S, min(LINGER_S, max(grace_s, QUIET_S)))
    await asyncio.gather(server.stop(STOP_GRACE_S), *([http.stop()] if http is not None else []))
