"""OpenAI-compatible HTTP next to gRPC, from the same process and engine: POST /v1/chat/completions and
/v1/completions (whole, or streamed as server-sent events ending `data: [DONE]`), GET /v1/models,
GET /health, and the chat page at / (the package's static/ folder).

Chat UIs and their backends speak OpenAI's API, not gRPC. Starlette on uvicorn, run as a task on the
server's own event loop with uvicorn's signal handling off: the server's lifecycle (app.py) owns SIGTERM,
and the HTTP port follows the gRPC port's phases. It opens with the gRPC port; /health answers 503 until
the model is warm, 200 while serving; from SIGTERM on every new request gets 503 while running ones
finish within the grace period, and the port closes after the drain.

A request goes through the same Serving as a gRPC call (serving.py): the body becomes
GenerationParameters and meets the same validation and limits; `priority` (a body field, -1000..1000,
higher first), a deadline (the X-Request-Timeout-S header, in seconds), admission, the in-flight count
a drain waits for, request metrics, and the same bearer token (an `Authorization: Bearer` header; /health
is open unless --auth-health, like gRPC health; the static page is open, as it holds no data). A refusal
keeps its gRPC meaning, mapped onto an HTTP status in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}, with the gRPC status's name as `code`; a failure after
a stream's first byte is sent as a last event of that shape (what the openai client raises as APIError).

A client that closes its connection aborts its generation at the next engine step, as a cancelled gRPC
stream does: every generation watches the ASGI disconnect message while it runs, streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from modelserve_client.v1 import generation_pb2 as pb
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from modelserve.engine.request import FinishReason, StreamEvent, TokenLogprob, TokenLogprobs
from modelserve.server.chat import ChatMessage
from modelserve.server.lifecycle import STOP_GRACE_S
from modelserve.server.security import bearer_refusal, tls_enabled
from modelserve.server.serving import RequestFailed, Serving, raise_for
from modelserve.telemetry.http_server import HttpTelemetryMiddleware

if TYPE_CHECKING:
    from modelserve.config import Config
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.engine.frontend import RequestStream
    from modelserve.engine.request import Request
    from modelserve.models.loader import ModelInfo as ServedModel
    from modelserve.server.validation import Limits
    from modelserve.telemetry.request_outcome import OutcomeTracker
    from modelserve.telemetry.setup import Telemetry

log = logging.getLogger("modelserve")
STATIC_DIR = Path(__file__).with_name("static")
HEALTH_HINT = "GET /health answers 200"
TIMEOUT_HEADER = "x-request-timeout-s"  # the caller's deadline, in seconds from now (gRPC sends its own)
REQUEST_ID_HEADER = "x-request-id"  # the request id, as GenerateRequest.request_id; echoed in the response
EXPECTED_HEADER = "an 'Authorization: Bearer <token>' header"
SEED_MAX = 2**64 - 1  # GenerationParameters.seed is a uint64

# A refusal's gRPC status -> its HTTP status and OpenAI error type.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # the model has no chat template
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
}
# This face's own refusals of a generation request -> error.type, as the gRPC code a gRPC call would get.
_ERROR_TYPES = {404: "not_found", 413: "resource_exhausted"}
# GenerationParameters fields -> the body fields that set them, where OpenAI's names differ; a request's
# own choice (max_completion_tokens, or a completion's `logprobs` count) is added per request.
_BODY_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "truncate_input_tokens": "truncate_prompt_tokens",
    "include_stop_sequence": "include_stop_str_in_output",
}
_PARAMS_FIELD = re.compile(r"\bparams\.([a-z_]+)")
_LEADING_FIELD = re.compile(r"^(prompt|priority|messages(?:\[\d+\])?(?:\.[a-z]+)?)")
# OpenAI fields this server cannot honour, and the values that ask nothing of it.
_NEUTRAL = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
}
_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.STOP_TOKEN: "stop",
}


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error; str(exc) is its message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        counted: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = dict(headers or {})
        self.counted = counted  # already in modelserve.requests.rejected (the shared request path counts its own)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, self.headers)


def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_argument")


def _failure(exc: RequestFailed, names: Mapping[str, str]) -> ApiError:
    """A refusal of the shared request path as OpenAI's error, in the body's own field names."""
    status, kind = _HTTP_STATUS.get(exc.code, (500, "server_error"))
    message, param, headers = str(exc), None, {}
    if exc.code is grpc.StatusCode.INVALID_ARGUMENT:
        message, param = _body_names(message, names)
    if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if exc.retry_after_s is None:  # a step ran out of memory: not the caller's rate, but worth a retry
            status, kind = 503, "server_error"
        else:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return ApiError(status, message, kind=kind, param=param, code=exc.code.name.lower(), headers=headers, counted=True)


def _body_names(message: str, names: Mapping[str, str]) -> tuple[str, str | None]:
    """Validation names GenerationParameters' fields (params.max_new_tokens); this caller sent the body's
    (max_tokens): the message in the body's names, and the field it names first."""
    renamed: list[str] = []

    def rename(match: re.Match[str]) -> str:
        renamed.append(names.get(match[1], match[1]))
        return renamed[-1]

    text = _PARAMS_FIELD.sub(rename, message)
    leading = _LEADING_FIELD.match(message)
    if leading is not None:
        return text, names.get(leading[1], leading[1])
    return text, renamed[0] if renamed else None


class _Body:
    """A request's JSON object, read field by field with OpenAI's types: a wrong type is a 400 naming the
    field; null is the same as absent."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def typed(self, key: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self._data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise _invalid(f"{key} must be {what}, got {json.dumps(value)[:80]}", key)
        return value

    def number(self, key: str) -> float | None:
        value = self.typed(key, (int, float), "a number")
        return None if value is None else float(value)

    def integer(self, key: str) -> int | None:
        value: int | None = self.typed(key, (int,), "an integer")
        return value

    def boolean(self, key: str) -> bool | None:
        value: bool | None = self.typed(key, (bool,), "true or false")
        return value

    def string(self, key: str) -> str | None:
        value: str | None = self.typed(key, (str,), "a string")
        return value

    def strings(self, key: str) -> list[str]:
        """A string or a list of strings (OpenAI's `stop`); [] when absent."""
        value = self.typed(key, (str, list), "a string or a list of strings")
        items = [value] if isinstance(value, str) else (value or [])
        if not all(isinstance(item, str) for item in items):
            raise _invalid(f"{key} must be a string or a list of strings", key)
        return items

    def integers(self, key: str) -> list[int]:
        value = self.typed(key, (list,), "a list of integers") or []
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise _invalid(f"{key} must be a list of integers", key)
        return list(value)

    def array(self, key: str) -> list[Any] | None:
        value: list[Any] | None = self.typed(key, (list,), "a list")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] | None = self.typed(key, (dict,), "an object")
        return value or {}

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field that asks what this server does not do (several choices, tools)."""
        for key, neutral in _NEUTRAL.items():
            value = self._data.get(key)
            if value is not None and value not in neutral:
                if key == "n":
                    raise _invalid(f"n must be 1, got {json.dumps(value)}: this server returns one choice", key)
                raise _invalid(f"{key} is not supported by this server (got {json.dumps(value)[:80]})", key)
        kind = self.mapping("response_format").get("type", "text")
        if kind != "text":
            raise _invalid(f"response_format {kind!r} is not supported by this server: only 'text'", "response_format")


def _parameters(body: _Body, chat: bool) -> tuple[pb.GenerationParameters, dict[str, str]]:
    """The body's sampling fields as GenerationParameters (validated later, by the shared request path),
    and the body's name of each field, for that path's messages."""
    params = pb.GenerationParameters()
    names = dict(_BODY_NAMES)

    def put(field: str, key: str, value: object) -> None:
        if value is None:
            return
        names[field] = key
        try:
            setattr(params, field, value)
        except (ValueError, TypeError) as exc:  # out of the proto field's own range (int32)
            raise _invalid(f"{key} is out of range: {exc}", key) from None

    max_key = "max_completion_tokens" if chat and body.has("max_completion_tokens") else "max_tokens"
    put("max_new_tokens", max_key, body.integer(max_key))
    put("min_new_tokens", "min_tokens", body.integer("min_tokens"))
    put("temperature", "temperature", body.number("temperature"))
    put("top_p", "top_p", body.number("top_p"))
    put("top_k", "top_k", body.integer("top_k"))
    put("repetition_penalty", "repetition_penalty", body.number("repetition_penalty"))
    put("ignore_eos", "ignore_eos", body.boolean("ignore_eos"))
    put("include_stop_sequence", "include_stop_str_in_output", body.boolean("include_stop_str_in_output"))
    put("truncate_input_tokens", "truncate_prompt_tokens", body.integer("truncate_prompt_tokens"))
    seed = body.integer("seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise _invalid(f"seed must be in [0, {SEED_MAX}], got {seed}", "seed")
    put("seed", "seed", seed)
    params.stop.extend(body.strings("stop"))
    try:
        params.stop_token_ids.extend(body.integers("stop_token_ids"))
    except ValueError as exc:
        raise _invalid(f"stop_token_ids is out of range: {exc}", "stop_token_ids") from None
    if chat:  # logprobs: true, top_logprobs: n
        put("logprobs", "logprobs", body.boolean("logprobs"))
        put("top_logprobs", "top_logprobs", body.integer("top_logprobs"))
    else:  # logprobs: n, the alternatives per token (0: the chosen token's only)
        top = body.integer("logprobs")
        if top is not None:
            params.logprobs = True
            put("top_logprobs", "logprobs", top)
    return params, names


def _messages(body: _Body) -> list[ChatMessage]:
    raw = body.array("messages")
    if raw is None:
        raise _invalid("messages is required: a list of {role, content} objects", "messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object with role and content", where)
        role = item.get("role")
        if not isinstance(role, str):
            raise _invalid(f"{where}.role must be a string", f"{where}.role")
        if item.get("tool_calls"):
            raise _invalid(f"{where}.tool_calls: tool calls are not supported by this server", f"{where}.tool_calls")
        messages.append(ChatMessage(role, _content(item.get("content"), f"{where}.content")))
    return messages


def _content(content: object, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are taken."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = json.dumps(kind) if isinstance(part, dict) else "not an object"
            raise _invalid(
                f"{where}[{j}] must be a text part ({{'type': 'text', 'text': ...}}); got type {got}: this "
                "server takes text only",
                f"{where}[{j}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(body: _Body) -> str:
    """A completion's prompt: one string (a list holding one string is taken as it)."""
    value = body.typed("prompt", (str, list), "a string")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise _invalid("prompt must be one string: this server takes one text prompt per request", "prompt")
    return value


def _timeout_s(request: HttpRequest) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _invalid(f"the X-Request-Timeout-S header must be a positive number of seconds, got {raw!r}", None)
    return value


# ---- the answer's shape -------------------------------------------------------------------------------------


def _finite(logprob: float) -> float:
    """JSON has no NaN or infinity; OpenAI writes an impossible token's log-probability as -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


def _usage(n_prompt: int, event: StreamEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": event.output_tokens,
        "total_tokens": n_prompt + event.output_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }


class _Layout:
    """Where one request's text, log-probabilities and ending go: chat.completion(.chunk) objects, or
    text_completion ones."""

    def __init__(self, chat: bool, model_id: str, logprobs: bool, include_usage: bool) -> None:
        self.chat, self.logprobs, self.include_usage = chat, logprobs, include_usage
        self._id = ""
        self._object = "chat.completion" if chat else "text_completion"
        self._model_id = model_id
        self._created = int(time.time())
        self._text_offset = 0  # a completion's logprobs say where each token starts in the text

    def begin(self, request_id: str) -> None:
        """Name the answer after its request, once the shared path has given it an id."""
        self._id = ("chatcmpl-" if self.chat else "cmpl-") + request_id

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = self._object + (".chunk" if chunk and self.chat else "")
        envelope = {"id": self._id, "object": kind, "created": self._created, "model": self._model_id}
        envelope["choices"] = choices
        if chunk and self.include_usage:
            envelope["usage"] = None  # as OpenAI: only the last chunk carries it
        return envelope

    def opening(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        return [self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], True)]

    def piece(self, text: str, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        key, value = ("delta", {"content": text}) if self.chat else ("text", text)
        choice = {"index": 0, key: value, "logprobs": self._logprobs(logprobs), "finish_reason": None}
        return self._envelope([choice], True)

    def ending(self, reason: str) -> dict[str, Any]:
        key, value = ("delta", {}) if self.chat else ("text", "")
        return self._envelope([{"index": 0, key: value, "logprobs": None, "finish_reason": reason}], True)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([], True), "usage": usage}

    def whole(self, text: str, logprobs: Sequence[TokenLogprobs], reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        key, value = ("message", {"role": "assistant", "content": text}) if self.chat else ("text", text)
        choice = {"index": 0, key: value, "logprobs": self._logprobs(logprobs), "finish_reason": reason}
        return {**self._envelope([choice], False), "usage": usage}

    def _logprobs(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:

            def one(t: TokenLogprob) -> dict[str, Any]:
                return {"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.token.encode())}

            return {"content": [{**one(lp.chosen), "top_logprobs": [one(t) for t in lp.top]} for lp in logprobs]}
        offsets = []
        for lp in logprobs:
            offsets.append(self._text_offset)
            self._text_offset += len(lp.chosen.token)
        return {
            "tokens": [lp.chosen.token for lp in logprobs],
            "token_logprobs": [_finite(lp.chosen.logprob) for lp in logprobs],
            "top_logprobs": [{t.token: _finite(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _watch_disconnect(receive: Receive, stream: RequestStream, gone: asyncio.Event) -> None:
    """Abort the generation (at the engine's next step) once the client closes its connection."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    stream.abort(FinishReason.CANCELLED)


class _Generation(Response):
    """One generation, run while Starlette sends this response: submitted, streamed or collected, and
    aborted if the client goes away. Counted in flight from before the engine sees it to its last byte,
    so a drain waits for it."""

    def __init__(
        self,
        serving: Serving,
        start: Callable[[], tuple[Request, RequestStream]],
        prompt: str,
        layout: _Layout,
        stream: bool,
        names: Mapping[str, str],
    ) -> None:
        super().__init__()
        self._serving, self._start, self._prompt = serving, start, prompt
        self._layout, self._stream, self._names = layout, stream, names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._serving.counted():
            try:
                self._serving.ready(HEALTH_HINT)  # again: a drain may have begun while the body was read
                request, stream = self._start()
            except RequestFailed as exc:
                await _failure(exc, self._names).response()(scope, receive, send)
                return
            outcome = self._serving.track(request, self._prompt, self._layout.chat)
            self._layout.begin(request.request_id)
            gone = asyncio.Event()
            watcher = asyncio.ensure_future(_watch_disconnect(receive, stream, gone))
            headers = {"x-request-id": request.request_id}
            try:
                if self._stream:
                    await self._send_events(send, request, stream, outcome, gone, headers)
                else:
                    response = await self._collect(request, stream, outcome, gone, headers)
                    if response is not None:
                        await response(scope, receive, send)
            finally:
                watcher.cancel()
                stream.abort(FinishReason.CANCELLED)  # a no-op once it finished
                outcome.close(FinishReason.CANCELLED.value)

    async def _collect(
        self,
        request: Request,
        stream: RequestStream,
        outcome: OutcomeTracker,
        gone: asyncio.Event,
        headers: dict[str, str],
    ) -> Response | None:
        """The whole answer, or its error; None when the client went away."""
        text: list[str] = []
        logprobs: list[TokenLogprobs] = []
        try:
            async for event in stream:
                outcome.saw(event)
                if gone.is_set():
                    return None
                text.append(event.text)
                logprobs.extend(event.logprobs)
                if event.finish is not None:
                    raise_for(event)
                    whole = self._layout.whole(
                        "".join(text),
                        logprobs,
                        _FINISH_REASONS[event.finish.reason],
                        _usage(len(request.prompt_ids), event),
                    )
                    return JSONResponse(whole, headers=headers)
        except RequestFailed as exc:
            error = _failure(exc, self._names)
            return JSONResponse(error.body(), error.status, {**headers, **error.headers})
        raise AssertionError("a request stream ends with its finish event")

    async def _send_events(
        self,
        send: Send,
        request: Request,
        stream: RequestStream,
        outcome: OutcomeTracker,
        gone: asyncio.Event,
        headers: dict[str, str],
    ) -> None:
        layout = self._layout
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # a proxy in front (nginx) must pass each event on at once
            *((k.encode(), v.encode("latin-1")) for k, v in headers.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})

        async def event(payload: object) -> None:
            await send({"type": "http.response.body", "body": _sse(payload), "more_body": True})

        try:
            for chunk in layout.opening():
                await event(chunk)
            async for engine_event in stream:
                outcome.saw(engine_event)
                if gone.is_set():
                    return
                if engine_event.text or engine_event.logprobs:
                    await event(layout.piece(engine_event.text, engine_event.logprobs))
                if engine_event.finish is not None:
                    raise_for(engine_event)
                    await event(layout.ending(_FINISH_REASONS[engine_event.finish.reason]))
                    if layout.include_usage:
                        await event(layout.usage(_usage(len(request.prompt_ids), engine_event)))
            last = b"data: [DONE]\n\n"
        except RequestFailed as exc:
            last = _sse(_failure(exc, self._names).body())
        await send({"type": "http.response.body", "body": last, "more_body": False})


# ---- the app ------------------------------------------------------------------------------------------------


class _Api:
    """The endpoints, over one Serving."""

    def __init__(self, serving: Serving, token: str | None, auth_health: bool) -> None:
        self._serving = serving
        self._token = token
        self._auth_health = auth_health
        self._max_body_bytes = serving.config.max_message_bytes
        self._created = int(time.time())

    def _authorize(self, request: HttpRequest) -> None:
        if self._token is None:
            return
        metadata = [("authorization", value) for value in request.headers.getlist("authorization")]
        refusal = bearer_refusal(metadata, self._token, EXPECTED_HEADER)
        if refusal is not None:
            raise ApiError(401, refusal, param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _ready(self) -> tuple[Engine, ServedModel, Limits]:
        try:
            return self._serving.ready(HEALTH_HINT)
        except RequestFailed as exc:
            raise _failure(exc, {}) from None

    async def _body(self, request: HttpRequest) -> _Body:
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
            raise _invalid(f"the request body is not valid JSON: {exc}", None) from None
        if not isinstance(data, dict):
            raise _invalid("the request body must be a JSON object", None)
        try:  # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no text can hold (gRPC refuses it too)
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _invalid("the request body holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)", None) from None
        return _Body(data)

    async def health(self, request: HttpRequest) -> Response:
        if self._auth_health:
            self._authorize(request)
        health = self._serving.health()
        return JSONResponse({"status": health.phase.name.lower()}, 200 if health.up else 503)

    async def models(self, request: HttpRequest) -> Response:
        self._authorize(request)
        _, model, limits = self._ready()
        return JSONResponse({"object": "list", "data": [self._model_card(model.model_id, limits.max_sequence_length)]})

    async def model(self, request: HttpRequest) -> Response:
        self._authorize(request)
        _, model, limits = self._ready()
        _check_model(request.path_params["model"], model.model_id)
        return JSONResponse(self._model_card(model.model_id, limits.max_sequence_length))

    def _model_card(self, model_id: str, max_model_len: int) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self._created,
            "owned_by": "modelserve",
            "max_model_len": max_model_len,
        }

    async def chat_completions(self, request: HttpRequest) -> Response:
        self._authorize(request)
        engine, model, limits = self._ready()
        with self._counting_refusals():
            body = await self._body(request)
            _check_model(body.string("model"), model.model_id)
            body.refuse_unsupported()
            messages = _messages(body)
            try:
                prompt = self._serving.chat_prompt(model, limits, messages)
            except RequestFailed as exc:
                raise _failure(exc, {}) from None
            return self._generation(request, body, True, prompt, (engine, model, limits))

    async def completions(self, request: HttpRequest) -> Response:
        self._authorize(request)
        engine, model, limits = self._ready()
        with self._counting_refusals():
            body = await self._body(request)
            _check_model(body.string("model"), model.model_id)
            body.refuse_unsupported()
            return self._generation(request, body, False, _prompt(body), (engine, model, limits))

    @contextlib.contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """A generation request this face refuses itself (its body, its model name, an unsupported field) is
        counted in modelserve.requests.rejected as the shared path counts its own, by the gRPC code's name
        (an unauthenticated call is not, on either face)."""
        try:
            yield
        except ApiError as exc:
            if not exc.counted:
                self._serving.rejected(_ERROR_TYPES.get(exc.status, "invalid_argument"))
            raise

    def _generation(
        self, request: HttpRequest, body: _Body, chat: bool, prompt: str, served: tuple[Engine, ServedModel, Limits]
    ) -> Response:
        engine, model, limits = served
        params, names = _parameters(body, chat)
        names["prompt"] = "messages" if chat else "prompt"
        stream = bool(body.boolean("stream"))
        include_usage = stream and bool(body.mapping("stream_options").get("include_usage"))
        priority = body.integer("priority") or 0
        timeout_s = _timeout_s(request)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")

        def start() -> tuple[Request, RequestStream]:
            return self._serving.start(
                engine,
                model,
                limits,
                prompt,
                params,
                request_id=request_id,
                priority=priority,
                time_remaining_s=timeout_s,
                add_special_tokens=not chat,  # a chat template writes the special tokens itself (chat.py)
            )

        layout = _Layout(chat, model.model_id, params.logprobs, include_usage)
        return _Generation(self._serving, start, prompt, layout, stream, names)


def _report_end(task: asyncio.Task[None]) -> None:
    """uvicorn's task ended: say so when it failed (the gRPC port serves on; the HTTP one is gone)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the HTTP server stopped: %s", task.exception(), exc_info=task.exception())


def _check_model(name: str | None, served: str) -> None:
    """Another model's name is a 404, as OpenAI answers it; no name means the one served."""
    if name is not None and name != served:
        raise ApiError(
            404,
            f"the model {name!r} does not exist: this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


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
