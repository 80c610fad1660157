"""OpenAI-compatible HTTP next to gRPC, from the same process and engine: POST /v1/chat/completions and
/v1/completions (whole, or streamed as server-sent events ending `data: [DONE]`), GET /v1/models,
GET /health, and the chat page at / (the package's static/ folder).

Chat UIs and their backends speak OpenAI's API, not gRPC. Starlette on uvicorn, run as a task on the
server's own event loop with uvicorn's signal handling off: the server's lifecycle (app.py) owns SIGTERM,
and the HTTP port follows the gRPC port's phases. It opens with the gRPC port; /health answers 503 until
the model is warm, 200 while serving; from SIGTERM on every new request gets 503 while running ones
finish within the grace period, and the port closes after the drain.

A request goes through the same Serving as a gRPC call (serving.py): the same validation and limits;
`priority` (a body field, -1000..1000, higher first), a deadline (the X-Request-Timeout-S header, in
seconds), admission, the in-flight count a drain waits for, request metrics, and the same bearer token (an
`Authorization: Bearer` header; /health is open unless --auth-health, like gRPC health; the static page is
open, as it holds no data). A refusal keeps its gRPC meaning, in OpenAI's error shape.

This module holds the endpoints, the error handlers and the port. Reading a body into the one parameter
model (core/params.py), and the refusals' shape: request.py. Writing the answer, whole or as server-sent
events, and aborting a generation whose client went away: response.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from modelserve.server.core.adapters import AdapterError
from modelserve.server.core.params import StructuredOutput
from modelserve.server.core.serving import RequestFailed, Serving, sample_choices
from modelserve.server.core.tools import ToolCalling, constraint_for, parser_for
from modelserve.server.core.unserved import UnknownFields
from modelserve.server.lifecycle import STOP_GRACE_S
from modelserve.server.openai.request import (
    ApiError,
    Body,
    chat_messages,
    chat_tools,
    completion_prompts,
    failure,
    generation_parameters,
    invalid,
    request_timeout_s,
)
from modelserve.server.openai.response import Generation, Layout
from modelserve.server.security import bearer_refusal, tls_enabled
from modelserve.telemetry.http_server import HttpTelemetryMiddleware

if TYPE_CHECKING:
    from modelserve.config import Config
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.engine.request import Request
    from modelserve.models.loader import ModelInfo as ServedModel
    from modelserve.server.core.validation import Limits
    from modelserve.telemetry.setup import Telemetry

log = logging.getLogger("modelserve")
STATIC_DIR = Path(__file__).with_name("static")
HEALTH_HINT = "GET /health answers 200"
REQUEST_ID_HEADER = "x-request-id"  # the request id, as GenerateRequest.request_id; echoed in the response
EXPECTED_HEADER = "an 'Authorization: Bearer <token>' header"

# This face's own refusals of a generation request -> error.type, as the gRPC code a gRPC call would get.
_ERROR_TYPES = {404: "not_found", 413: "resource_exhausted"}


class _Api:
    """The endpoints, over one Serving."""

    def __init__(self, serving: Serving, token: str | None, auth_health: bool) -> None:
        self._serving = serving
        self._token = token
        self._auth_health = auth_health
        self._max_body_bytes = serving.config.max_message_bytes
        self._created = int(time.time())
        self._unknown = UnknownFields()

    def _authorize(self, request: HttpRequest) -> None:
        if self._token is None:
            return
        metadata = [("authorization", value) for value in request.headers.getlist("authorization")]
        refusal = bearer_refusal(metadata, self._token, EXPECTED_HEADER)
        if refusal is not None:
            raise ApiError(401, refusal, param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _ready(self, chat: bool = False) -> tuple[Engine, ServedModel, Limits]:
        try:
            return self._serving.ready(HEALTH_HINT, chat)
        except RequestFailed as exc:
            raise failure(exc, {}) from None

    async def _body(self, request: HttpRequest) -> Body:
        """The JSON object in the body, read up to the same bound as a gRPC message (--max-message-bytes)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body_bytes:
                raise ApiError(413, f"the request body is over {self._max_body_bytes} bytes (--max-message-bytes)")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except ValueError as exc:
            raise invalid(f"the request body is not valid JSON: {exc}", None) from None
        if not isinstance(data, dict):
            raise invalid("the request body must be a JSON object", None)
        try:  # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no text can hold (gRPC refuses it too)
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise invalid("the request body holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)", None) from None
        self._unknown.note(data)
        return Body(data)

    async def health(self, request: HttpRequest) -> Response:
        if self._auth_health:
            self._authorize(request)
        health = self._serving.health()
        return JSONResponse({"status": health.phase.name.lower()}, 200 if health.up else 503)

    async def models(self, request: HttpRequest) -> Response:
        """The base model, then each LoRA adapter with the base model as its `parent`, as vLLM lists them."""
        self._authorize(request)
        _, model, limits = self._ready()
        names = [model.model_id, *self._serving.adapters.loaded]
        cards = [self._model_card(name, model, limits) for name in names]
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, request: HttpRequest) -> Response:
        self._authorize(request)
        _, model, limits = self._ready()
        name = request.path_params["model"]
        self._adapter(name, model)
        return JSONResponse(self._model_card(name, model, limits))

    def _model_card(self, name: str, model: ServedModel, limits: Limits) -> dict[str, Any]:
        adapter = self._serving.adapters.loaded.get(name)
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "modelserve",
            "root": adapter.path if adapter is not None else model.source,
            "parent": model.model_id if adapter is not None else None,
            "max_model_len": limits.max_sequence_length,
        }

    def _adapter(self, name: str | None, model: ServedModel) -> str:
        """The LoRA adapter a request's `model` names ("" for the base model); 404 for a model not served."""
        try:
            return self._serving.adapters.resolve(name, model.model_id)
        except AdapterError as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None

    async def load_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"}: serve a PEFT LoRA directory by name."""
        self._authorize(request)
        body = await self._body(request)
        name, path = body.string("lora_name") or "", body.string("lora_path") or ""
        try:
            await self._serving.adapters.load(name, path)
        except AdapterError as exc:
            raise failure(RequestFailed(exc.code, str(exc)), {}) from None
        log.info("LoRA adapter %r loaded from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's POST /v1/unload_lora_adapter {"lora_name"}: requests still waiting for it end; running ones
        finish with it."""
        self._authorize(request)
        body = await self._body(request)
        name = body.string("lora_name") or ""
        try:
            await self._serving.adapters.unload(name)
        except AdapterError as exc:
            raise failure(RequestFailed(exc.code, str(exc)), {}) from None
        log.info("LoRA adapter %r unloaded", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def chat_completions(self, request: HttpRequest) -> Response:
        self._authorize(request)
        engine, model, limits = self._ready(chat=True)
        with self._counting_refusals(chat=True):
            body = await self._body(request)
            lora = self._adapter(body.string("model"), model)
            body.refuse_unsupported()
            messages = chat_messages(body)
            tools, choice = chat_tools(body)
            try:
                prompt = self._serving.chat_prompt(model, limits, messages, tools if choice.mode != "none" else ())
            except RequestFailed as exc:
                raise failure(exc, {}) from None
            calling = None
            if choice.mode != "none":
                calling = ToolCalling(
                    tools, choice, parser_for(model.chat_template, self._serving.config.tool_call_parser)
                )
            return self._generation(request, body, True, [prompt], (engine, model, limits), calling, lora)

    async def completions(self, request: HttpRequest) -> Response:
        self._authorize(request)
        engine, model, limits = self._ready()
        with self._counting_refusals():
            body = await self._body(request)
            lora = self._adapter(body.string("model"), model)
            body.refuse_unsupported()
            prompts = completion_prompts(body, self._serving.config.max_batch_requests)
            return self._generation(request, body, False, prompts, (engine, model, limits), lora=lora)

    @contextlib.contextmanager
    def _counting_refusals(self, chat: bool = False) -> Iterator[None]:
        """A generation request this face refuses itself (its body, its model name, an unsupported field) is
        counted in modelserve.requests.rejected as the shared path counts its own, by the gRPC code's name
        (an unauthenticated call is not, on either face)."""
        try:
            yield
        except ApiError as exc:
            if not exc.counted:
                self._serving.rejected(_ERROR_TYPES.get(exc.status, "invalid_argument"), chat)
            raise

    def _generation(
        self,
        request: HttpRequest,
        body: Body,
        chat: bool,
        prompts: Sequence[str | list[int]],
        served: tuple[Engine, ServedModel, Limits],
        calling: ToolCalling | None = None,
        lora: str = "",
    ) -> Response:
        """One engine request per prompt (a completion may send a list) and sample (`n`), each a choice of the
        answer, ordered as OpenAI orders them: prompt by prompt, a prompt's samples together."""
        engine, model, limits = served
        params, names = generation_parameters(body, chat)
        names["prompt"] = "messages" if chat else "prompt"
        if calling is not None and (schema := constraint_for(calling.tools, calling.choice)) is not None:
            if params.structured_output is not None:
                raise invalid(
                    "tool_choice required or a named function cannot be combined with a response_format", "tool_choice"
                )
            params = dataclasses.replace(params, structured_output=StructuredOutput("json_schema", schema))
            names["structured_output.json_schema"] = "tool_choice"
        stream = bool(body.boolean("stream"))
        echo = bool(body.boolean("echo"))
        if echo and chat:
            raise invalid("echo is for /v1/completions: a chat answer does not repeat the conversation", "echo")
        if stream and body.integer("prompt_logprobs") is not None:
            raise invalid(
                "prompt_logprobs is not available with stream (it is with echo and logprobs)", "prompt_logprobs"
            )
        include_usage = stream and bool(body.mapping("stream_options").get("include_usage"))
        priority = body.integer("priority") or 0
        timeout_s = request_timeout_s(request)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        keep = body.integer("n")
        keep = 1 if keep is None else keep
        best_of = body.integer("best_of")
        samples = keep if best_of is None else best_of  # generated per prompt; the best `keep` are returned
        bound = self._serving.max_choices(engine)
        most = max(1, bound // len(prompts))
        field = "n" if best_of is None else "best_of"
        if not 1 <= samples <= most:
            raise invalid(
                f"{field} must be in [1, {most}], got {samples} (all the samples of a request, prompts times "
                f"{field}, are at most {bound}: --max-batch-requests and --max-waiting-requests)",
                field,
            )
        if not 1 <= keep <= samples:
            raise invalid(f"n must be in [1, best_of = {samples}], got {keep}", "n")
        if stream and keep < samples:
            raise invalid("best_of must equal n when streaming: the best are known only at the end", "best_of")
        sampled = params
        if keep < samples and not params.logprobs:  # ranking reads each token's log-probability
            sampled = dataclasses.replace(params, logprobs=True)
        base_id = request_id or uuid.uuid4().hex  # the answer's id; its choices' requests are BASE-0, BASE-1, ...
        total = len(prompts) * samples
        suffix = len(f"-{total - 1}")
        if total > 1 and len(base_id) + suffix > limits.max_request_id_chars:
            raise invalid(
                f"X-Request-Id is {len(base_id)} characters; with {total} choices (each named ID-N) it may "
                f"have at most {limits.max_request_id_chars - suffix}",
                None,
            )
        # OpenAI's order: prompt by prompt, a prompt's samples together.
        choices = [
            choice
            for prompt in prompts
            for choice in (
                sample_choices(prompt, sampled, samples)
                if isinstance(prompt, str)
                else sample_choices("", sampled, samples, prompt_ids=prompt)
            )
        ]
        choices = [
            dataclasses.replace(c, request_id=f"{base_id}-{i}" if total > 1 else request_id)
            for i, c in enumerate(choices)
        ]

        async def start() -> list[tuple[Request, RequestStream]]:
            self._serving.ready(HEALTH_HINT, chat)  # again: a drain may have begun while the body was read
            return await self._serving.start_choices(
                engine,
                model,
                limits,
                choices,
                priority=priority,
                time_remaining_s=timeout_s,
                chat=chat,
                where=(lambda i: f"prompt[{i // samples}]") if len(prompts) > 1 else None,
                lora=lora,
            )

        scored = body.integer("prompt_logprobs") is not None
        layout = Layout(chat, lora or model.model_id, params.logprobs, include_usage, echo, scored, calling)
        answer_id = base_id if len(choices) > 1 else None  # one choice: its request's own id
        prompts_per_choice = [choice.prompt for choice in choices]

        def decode(ids: Sequence[int]) -> str:
            return str(model.tokenizer.decode(list(ids), skip_special_tokens=False))

        return Generation(
            self._serving, start, prompts_per_choice, (samples, keep), layout, stream, names, answer_id, decode
        )


def _report_end(task: asyncio.Task[None]) -> None:
    """uvicorn's task ended: say so when it failed (the gRPC port serves on; the HTTP one is gone)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the HTTP server stopped: %s", task.exception(), exc_info=task.exception())


async def _api_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    """Starlette's own answers (no such route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, exc.detail, code=code, headers=exc.headers).response()


async def _server_fault(request: HttpRequest, exc: Exception) -> Response:
    """A bug of ours: OpenAI's shape for the caller; Starlette re-raises it, so uvicorn logs the traceback."""
    return ApiError(
        500, f"internal server error: {type(exc).__name__}", kind="server_error", code="internal"
    ).response()


def build_app(serving: Serving, token: str | None, auth_health: bool, telemetry: Telemetry | None) -> Starlette:
    api = _Api(serving, token, auth_health)

    async def index(request: HttpRequest) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/load_lora_adapter", api.load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", api.unload_lora_adapter, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = []
    if telemetry is not None:
        middleware.append(Middleware(HttpTelemetryMiddleware, telemetry.tracer_provider, telemetry.meter))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_fault},
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: SIGTERM and SIGINT are the server lifecycle's (app.py)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP port: bound before anything starts (a port in use fails start-up as a bad --port does),
    served by uvicorn as a task on this event loop, closed by `stop` after the drain. With --tls-cert-file
    it speaks HTTPS with the gRPC port's certificate (and client CA, for mutual TLS): a bearer token must
    not travel in clear text on one port when the operator protected the other."""

    def __init__(self, config: Config, serving: Serving, token: str | None, telemetry: Telemetry | None) -> None:
        self._config = config
        self._app = build_app(serving, token, config.auth_health, telemetry)
        self._socket: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Listen on --host:--http-port (OSError if it cannot); return the port."""
        host, port = self._config.host, self._config.http_port
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen()  # connections wait in the backlog until uvicorn accepts
        except OSError:
            sock.close()
            raise
        self._socket = sock
        return int(sock.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if tls_enabled(self._config) else "http"

    def start(self) -> None:
        assert self._socket is not None, "bind() first"
        cfg, tls = self._config, dict[str, Any]()
        if tls_enabled(cfg):
            tls.update(ssl_certfile=cfg.tls_cert_file, ssl_keyfile=cfg.tls_key_file)
        if cfg.tls_client_ca_file:
            tls.update(ssl_ca_certs=cfg.tls_client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,  # the server's logging as configured (cli.py), not uvicorn's
            access_log=False,  # no line per request, as for gRPC calls
            timeout_graceful_shutdown=math.ceil(STOP_GRACE_S),  # after the drain: only /health, /v1/models calls
            log_level=logging.WARNING,  # its INFO lines (under the name uvicorn.error) repeat what app.py logs
            **tls,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        self._task.add_done_callback(_report_end)

    async def stop(self) -> None:
        """Close the port and the idle connections; wait for what is still answering (STOP_GRACE_S at most).
        Never raises: the rest of the shutdown (the engine core, telemetry) must still run."""
        assert self._server is not None and self._task is not None, "start() first"
        self._server.should_exit = True
        await asyncio.wait([self._task])
