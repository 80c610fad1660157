"""The server's life: open the port, load and warm up, serve, drain on SIGTERM.

Standard health (grpc.health.v1) is NOT_SERVING from the moment the port opens
until the model is loaded and one warm-up generation has run, so Kubernetes
never routes to a server that cannot answer; it goes NOT_SERVING again the
moment a shutdown begins, and for good if the engine loop dies (so Kubernetes
restarts the pod instead of routing to a server that cannot generate). torch and
transformers are imported only after the port is open: a probe gets a real
NOT_SERVING instead of a refused connection.

A shutdown drains: new calls are refused (UNAVAILABLE) at once, running streams
get `grace_s` to finish, and whatever still runs then is ended by the engine, so
each caller gets a last message (finish_reason CANCELLED) and an UNAVAILABLE
status that says why, not a cut connection.
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
from modelserve.server.parsing import RequestParsingInterceptor
from modelserve.server.security import (
    OPEN_METHOD_PREFIXES,
    BearerTokenInterceptor,
    resolve_token,
    server_credentials,
)
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
# After the grace period the engine ends the remaining requests; their handlers need a moment to send
# the last message and status before the server cancels whatever is left.
FINAL_MESSAGE_S = 5.0


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


def _log_security(config: Config, tls: bool, token_auth: bool) -> None:
    """Say what protects the port (never the token itself)."""
    if not tls:
        transport = "plain text (no TLS)"
    elif config.tls_client_ca_file:
        transport = f"mutual TLS (client certificates signed by {config.tls_client_ca_file})"
    else:
        transport = "TLS"
    if not token_auth:
        auth = "no token auth"
    elif config.auth_health:
        auth = "bearer token required on every method"
    else:
        auth = "bearer token required (standard health and reflection open)"
    log.info("transport: %s; %s", transport, auth)
    if token_auth and not tls:
        log.warning("token auth without TLS: the token travels in clear text")


async def _drain(server: grpc.aio.Server, engine: Engine | None, grace_s: float) -> None:
    """Refuse new calls; let running ones finish for `grace_s`; then end the rest with a last message."""
    stopped = asyncio.ensure_future(server.stop(grace_s + FINAL_MESSAGE_S))
    done, _ = await asyncio.wait({stopped}, timeout=grace_s)
    if not done and engine is not None:
        from modelserve.engine.request import FinishReason

        stats = engine.stats()
        log.warning("grace period over: ending %d running and %d waiting requests", stats.running, stats.waiting)
        engine.abort_all(
            FinishReason.CANCELLED,
            f"the server is shutting down and its {grace_s:g}s grace period is over; retry on another replica",
        )
    await stopped


async def serve(config: Config) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    try:
        credentials = server_credentials(config)
        token = resolve_token(config)
    except ValueError as exc:
        log.error("invalid TLS/auth settings: %s", exc)
        return 2
    if config.max_waiting_requests < 1 or config.max_batch_size < 1:
        log.error("--max-waiting-requests and --max-batch-size must be at least 1")
        return 2
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
    if token is not None:  # innermost, so refused calls still show in spans and RPC metrics
        open_methods = () if config.auth_health else OPEN_METHOD_PREFIXES
        interceptors.append(BearerTokenInterceptor(token, open_method_prefixes=open_methods))
    interceptors.append(RequestParsingInterceptor())  # innermost: after auth, so strangers' bytes stay unparsed
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
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        return 2
    _log_security(config, credentials is not None, token is not None)
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
                    max_waiting_requests=config.max_waiting_requests,
                    max_waiting_tokens=config.max_waiting_tokens,
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
            engine_stopped = asyncio.ensure_future(engine.wait_stopped())
            await asyncio.wait({stopping, engine_stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                log.error("the engine loop died: health NOT_SERVING until this process is restarted")
                servicer.phase = Phase.FAILED
                for name in ("", SERVICE_NAME):
                    await health_servicer.set(name, NOT_SERVING)
                exit_code = 1
                await stopping
        else:
            loading.cancel()
        log.info("shutting down: health NOT_SERVING, new calls refused, running streams get %gs", config.grace_s)
    except Exception:
        log.exception("server failed")
        exit_code = 1
    finally:
        if servicer.phase is not Phase.FAILED:
            servicer.phase = Phase.DRAINING
        await health_servicer.enter_graceful_shutdown()
        await _drain(server, engine, config.grace_s)
        if engine is not None:
            engine.shutdown()
        if telemetry is not None:
            telemetry.shutdown()
        log.info("stopped")
    return exit_code
