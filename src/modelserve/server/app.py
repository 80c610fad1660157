"""The server's life: open the port, load and warm up, serve, drain on SIGTERM.

Standard health (grpc.health.v1) is NOT_SERVING from the moment the port opens
until the model is loaded and one warm-up generation has run, so Kubernetes
never routes to a server that cannot answer; it goes NOT_SERVING again the
moment a shutdown begins. torch and transformers are imported only after the
port is open: a probe gets a real NOT_SERVING instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from modelserve.config import Config
from modelserve.server.servicer import SERVICE_NAME, GenerationServicer, Phase
from modelserve.telemetry.rpc_metrics import RpcMetricsInterceptor
from modelserve.telemetry.setup import Telemetry, start_telemetry

if TYPE_CHECKING:
    from modelserve.engine.engine import Engine
    from modelserve.models.loader import LoadedModel

log = logging.getLogger("modelserve")

T = TypeVar("T")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
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


def load(config: Config) -> LoadedModel:
    """Load the configured model (or build and load the demo model)."""
    from modelserve.models.demo import DEMO_MODEL_ID, demo_model_dir
    from modelserve.models.loader import load_model, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.model is None:
        log.warning(
            "no --model given: serving the embedded DEMO model (random weights, so its text is random). "
            "Pass --model PATH to serve a real Hugging Face model."
        )
        path = demo_model_dir(config.cache_dir)
        return load_model(str(path), device, dtype, model_id=DEMO_MODEL_ID, is_demo=True)
    return load_model(config.model, device, dtype, trust_remote_code=config.trust_remote_code)


async def warm_up(engine: Engine, model: LoadedModel) -> None:
    """One short greedy generation through the whole path before we say SERVING."""
    from modelserve.engine.request import Request, SamplingParams

    prompt = tuple(model.encode("Hello")) or (model.eos_token_ids[0],)
    stream = engine.submit(Request("warm-up", prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    async for event in stream:
        if event.finish is not None and event.finish.error:
            raise RuntimeError(f"warm-up generation failed: {event.finish.error}")


async def serve(config: Config) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    metrics_host = config.metrics_host or config.host
    telemetry: Telemetry | None = None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.telemetry:
        try:
            telemetry = start_telemetry(metrics_host=metrics_host, metrics_port=config.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", metrics_host, config.metrics_port, exc)
            return 2
        if config.metrics_port:
            log.info("metrics: http://%s:%d/metrics", metrics_host, config.metrics_port)
        # Spans continue the caller's W3C trace context from metadata; then RPC metrics.
        interceptors = [
            aio_server_interceptor(tracer_provider=telemetry.tracer_provider),
            RpcMetricsInterceptor(telemetry.meter),
        ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, NOT_SERVING)
    servicer = GenerationServicer(config)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        return 2
    await server.start()
    log.info("listening on %s:%d; health NOT_SERVING until the model is loaded and warmed up", config.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine: Engine | None = None
    exit_code = 0
    try:
        started = time.monotonic()
        loading = asyncio.ensure_future(_in_daemon_thread(lambda: load(config)))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            try:
                model = loading.result()
            except Exception as exc:
                log.error("could not load the model: %s", exc)
                servicer.phase = Phase.FAILED
                return 1
            from modelserve.engine.engine import Engine, EngineConfig

            if telemetry is not None:  # before the engine's first step, so every point names the model
                telemetry.metrics.set_model(model.model_id)
            engine = Engine(
                model.model,
                model.tokenizer,
                model.eos_token_ids,
                EngineConfig(
                    max_batch_size=config.max_batch_size,
                    prefill_chunk_tokens=config.prefill_chunk_tokens,
                    kv_cache_bytes=config.kv_cache_bytes,
                    gpu_memory_fraction=config.gpu_memory_fraction,
                ),
                model.max_sequence_length,
                on_step=telemetry.metrics.record_step if telemetry else None,
            )
            engine.start(loop)
            log.info(
                "loaded %s (%s) on %s as %s in %.1fs",
                model.model_id,
                model.architecture,
                model.device,
                str(model.dtype).removeprefix("torch."),
                time.monotonic() - started,
            )
            if config.warmup:
                await warm_up(engine, model)
            if telemetry is not None:
                telemetry.metrics.attach_engine(engine.stats)
                if model.device.type == "cuda":
                    import torch

                    device = model.device
                    telemetry.metrics.attach_gpu_memory(
                        lambda: (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))
                    )
            servicer.attach(model, engine, telemetry.metrics if telemetry else None)
            servicer.phase = Phase.SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, SERVING)
            log.info("ready: serving %s on %s:%d", SERVICE_NAME, config.host, port)
            await stopping
        else:
            loading.cancel()
        log.info("shutting down: health NOT_SERVING, new calls refused, running streams get %.0fs", config.grace_s)
    except Exception:
        log.exception("server failed")
        exit_code = 1
    finally:
        servicer.phase = Phase.DRAINING
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        if engine is not None:
            engine.shutdown()
        if telemetry is not None:
            telemetry.shutdown()
        log.info("stopped")
    return exit_code
