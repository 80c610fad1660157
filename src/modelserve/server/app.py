"""The server process: open the port, load and warm up, serve, drain on SIGTERM.

Standard health (grpc.health.v1) is NOT_SERVING from the moment the port opens
until the model is loaded and one warm-up generation has run, so Kubernetes
never routes to a server that cannot answer; it goes NOT_SERVING again the
moment a shutdown begins, and for good if the engine loop dies (so Kubernetes
restarts the pod instead of routing to a server that cannot generate). torch and
transformers are imported only after the port is open: a probe gets a real
NOT_SERVING instead of a refused connection.

A shutdown drains (lifecycle.drain): new calls are refused (UNAVAILABLE) at
once, running streams get `grace_s` to finish, and whatever still runs then is
ended by the engine, so each caller gets a last message (finish_reason
CANCELLED) and an UNAVAILABLE status that says why, not a cut connection.

The OpenAI-compatible HTTP port (openai/app.py, --http-port) shares the phases: it
opens with the gRPC port, its /health says 200 only while serving, it answers
503 from the moment a shutdown begins, and it closes after the same drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from modelserve.config import STOP_SIGNALS, Config
from modelserve.gc_heap import freeze_startup_heap
from modelserve.server.core.serving import Phase, Serving
from modelserve.server.grpc.parsing import RequestParsingInterceptor
from modelserve.server.grpc.servicer import SERVICE_NAME, GenerationServicer
from modelserve.server.grpc.vllm import SERVICE_NAME as VLLM_SERVICE_NAME
from modelserve.server.grpc.vllm import VllmEngineServicer
from modelserve.server.openai.app import HttpServer
from modelserve.server.security import (
    OPEN_METHOD_PREFIXES,
    BearerTokenInterceptor,
    resolve_token,
    server_credentials,
)
from modelserve.telemetry.rpc_metrics import RpcMetricsInterceptor
from modelserve.telemetry.setup import Telemetry, start_telemetry
from modelserve.telemetry.tracing import server_interceptor

if TYPE_CHECKING:
    from modelserve.engine.client import ProcessEngine
    from modelserve.engine.core_spawn import CoreProcess
    from modelserve.models.loader import ModelInfo

log = logging.getLogger("modelserve")

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


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


def _interceptors(config: Config, telemetry: Telemetry | None, token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: tracing, RPC metrics, auth, then parsing (so strangers' bytes stay unparsed)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if telemetry is not None:  # spans continue the caller's W3C trace context from metadata
        interceptors += [
            server_interceptor(telemetry.tracer_provider),
            RpcMetricsInterceptor(telemetry.meter),
        ]
    if token is not None:  # inside telemetry, so refused calls still show in spans and RPC metrics
        open_methods = () if config.auth_health else OPEN_METHOD_PREFIXES
        interceptors.append(BearerTokenInterceptor(token, open_method_prefixes=open_methods))
    interceptors.append(RequestParsingInterceptor())
    return interceptors


# gRPC core reads INT_MAX as "no limit".
_NO_LIMIT_MS = 2**31 - 1


def _connection_age_options(config: Config) -> list[tuple[str, int]]:
    """GOAWAY on each connection once it is `max_connection_age_s` old (gRPC adds +-10% jitter, so clients do
    not all reconnect at once): the client opens a new one, re-resolving DNS, and so reaches replicas started
    since, while a replica's health Watch keeps it out of rotation until it serves.

    No grace limit (`max_connection_age_grace_ms`): GOAWAY only stops new calls on the connection; a stream on
    it runs to its own end. Any finite grace would cut a stream that outlives it with UNAVAILABLE and no last
    message, which no retry policy repeats: it would have to cover the drain's `grace_s` at the very least, and
    outside a shutdown a generation may run longer than that. A shutdown stays bounded all the same: the drain
    ends every stream after `grace_s` with a last message, then stops the server.
    """
    if config.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", _NO_LIMIT_MS),
    ]


def build_grpc_server(
    config: Config,
    serving: Serving,
    health_servicer: health.aio.HealthServicer,
    telemetry: Telemetry | None,
    token: str | None,
) -> grpc.aio.Server:
    """The gRPC server with its interceptors and services (no port yet): ours and vLLM's VllmEngine
    (grpc/vllm.py), both over `serving`."""
    server = grpc.aio.server(
        interceptors=_interceptors(config, telemetry, token),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *_connection_age_options(config),
        ],
    )
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(serving), server)
    vpb_grpc.add_VllmEngineServicer_to_server(VllmEngineServicer(serving), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        names = (SERVICE_NAME, VLLM_SERVICE_NAME, health_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    return server


async def _set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME, VLLM_SERVICE_NAME):
        await health_servicer.set(name, status)


async def _start_engine(
    core: CoreProcess, config: Config, info: ModelInfo, telemetry: Telemetry | None
) -> tuple[ProcessEngine, ModelInfo]:
    """Start the spawned engine core process on the model, warm it up, and let telemetry watch it."""
    from modelserve.server.lifecycle import start_engine_core, warm_up

    if telemetry is not None:  # before the engine's first step, so every point names the model
        telemetry.metrics.set_model(info.model_id)
    on_step = telemetry.metrics.record_step if telemetry else None
    engine, info = await start_engine_core(core, config, info, on_step=on_step)
    if config.warmup:
        try:
            await warm_up(engine, info)
        except BaseException:
            engine.shutdown()  # before the caller reports the failure: its core then ends quietly, not killed
            raise
    if telemetry is not None:
        telemetry.metrics.attach_engine(engine.stats)
        if config.vllm_metrics and telemetry.registry is not None:
            from modelserve.telemetry.vllm_aliases import VllmAliases  # imports torch: not before the port is open

            lora_slots = config.max_loras if config.enable_lora or config.lora_modules else 0
            telemetry.registry.register(VllmAliases(engine.stats, info.model_id, lora_slots))
        if info.device.type == "cuda":
            telemetry.metrics.attach_gpu_memory(
                lambda: (engine.stats().gpu_allocated_bytes, engine.stats().gpu_reserved_bytes)
            )
    return engine, info


class ClientGoneFilter(logging.Filter):
    """grpc.aio logs ExecuteBatchError at ERROR, with a traceback, when a call ends between a handler's last
    message and its status ("if client closed the connection while server responding", says grpc's own
    comment): a cancel, a disconnect or a deadline landing in that window. That is a caller's normal doing,
    so it becomes one INFO line. Our own writes already treat the same error as a cancel (tracing.py)."""

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.MESSAGE):
            method = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a call ended before its status could be sent (the caller left): %s", (method,)
            record.exc_info, record.exc_text = None, None
        return True


async def serve(config: Config, core: CoreProcess, stopped_early: Callable[[], bool]) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code. `core` is the engine core's process,
    spawned before this process imported the server (core_spawn.py): the engine takes it over, and wherever
    the server ends before or without that, it is ended here. `stopped_early` says whether a stop came before
    this could handle one (cli.py): it begins the drain at once."""
    try:
        return await _serve(config, core, stopped_early)
    finally:
        core.abandon()


async def _serve(config: Config, core: CoreProcess, stopped_early: Callable[[], bool]) -> int:
    from modelserve.models.lora import LoraError
    from modelserve.server.lifecycle import FINAL_MESSAGE_S, drain, in_daemon_thread, load_info

    logging.getLogger("grpc._cython.cygrpc").addFilter(ClientGoneFilter())

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
    if config.telemetry:
        try:
            telemetry = start_telemetry(metrics_host=metrics_host, metrics_port=config.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", metrics_host, config.metrics_port, exc)
            return 2
        if config.metrics_port:
            log.info("metrics: http://%s:%d/metrics", metrics_host, config.metrics_port)
    health_servicer = health.aio.HealthServicer()
    await _set_health(health_servicer, NOT_SERVING)
    serving = Serving(config)
    server = build_grpc_server(config, serving, health_servicer, telemetry, token)
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        return 2
    http: HttpServer | None = None
    if config.http_port:
        http = HttpServer(config, serving, token, telemetry)
        try:
            http_port = http.bind()
        except OSError as exc:
            log.error("cannot listen on %s:%d (--http-port): %s", config.host, config.http_port, exc)
            return 2
    _log_security(config, credentials is not None, token is not None)
    await server.start()
    log.info("listening on %s:%d; health NOT_SERVING until the model is loaded and warmed up", config.host, port)
    if http is not None:
        http.start()
        log.info("OpenAI-compatible HTTP API and chat page: %s://%s:%d/", http.scheme, config.host, http_port)

    stop = asyncio.Event()

    def begin_shutdown() -> None:
        if serving.phase is not Phase.FAILED:
            serving.phase = Phase.DRAINING  # from this moment every new call is answered UNAVAILABLE
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, begin_shutdown)
    if stopped_early():  # read after the handlers above took over: no stop falls between the two
        begin_shutdown()
    stopping = asyncio.ensure_future(stop.wait())

    engine: ProcessEngine | None = None
    exit_code = 0
    try:
        started = time.monotonic()
        loading = asyncio.ensure_future(in_daemon_thread(lambda: load_info(config)))
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            try:
                engine, model = await _start_engine(core, config, loading.result(), telemetry)
            except Exception as exc:
                core.abandon()
                log.error("could not load the model: %s", exc)
                serving.phase = Phase.FAILED
                return 1
            log.info(
                "loaded %s (%s) on %s as %s in %.1fs",
                model.model_id,
                model.architecture,
                model.device,
                str(model.dtype).removeprefix("torch."),
                time.monotonic() - started,
            )
            serving.attach(model, engine, telemetry.metrics if telemetry else None)
            try:
                await serving.adapters.load_configured(config.lora_modules)
            except LoraError as exc:
                log.error("could not load the LoRA adapters: %s", exc)
                serving.phase = Phase.FAILED
                return 1
            freeze_startup_heap("frontend")
            serving.phase = Phase.SERVING
            await _set_health(health_servicer, SERVING)
            log.info("ready: serving %s and %s on %s:%d", SERVICE_NAME, VLLM_SERVICE_NAME, config.host, port)
            engine_stopped = asyncio.ensure_future(engine.wait_stopped())
            await asyncio.wait({stopping, engine_stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                log.error("the engine stopped: health NOT_SERVING; this process exits so that it is restarted")
                serving.phase = Phase.FAILED
                await _set_health(health_servicer, NOT_SERVING)
                await serving.wait_idle(FINAL_MESSAGE_S)  # the open calls send their UNAVAILABLE
                return 1
        else:
            loading.cancel()
            core.abandon()
        log.info("shutting down: health NOT_SERVING, new calls refused, running streams get %gs", config.grace_s)
    except Exception:
        log.exception("server failed")
        exit_code = 1
    finally:
        if serving.phase is not Phase.FAILED:
            serving.phase = Phase.DRAINING
        await health_servicer.enter_graceful_shutdown()
        await drain(server, http, serving, engine, config.grace_s)
        if engine is not None:
            engine.shutdown()
        if telemetry is not None:
            telemetry.shutdown()
        log.info("stopped")
    return exit_code
