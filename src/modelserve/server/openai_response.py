"""Writing the answer: an engine stream as OpenAI's chat.completion or text_completion objects, whole, or
streamed as server-sent events (chat.completion.chunk) ending `data: [DONE]`, with `usage` and the
log-probabilities in OpenAI's layout. A refusal before the answer starts is an error response of OpenAI's
shape (openai_request.py); a failure after a stream's first byte is sent as a last event of that shape
(what the openai client raises as APIError).

A client that closes its connection aborts its generation at the next engine step, as a cancelled gRPC
stream does: every generation watches the ASGI disconnect message while it runs, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from modelserve.engine.request import FinishReason, StreamEvent, TokenLogprob, TokenLogprobs
from modelserve.server.openai_request import failure
from modelserve.server.serving import RequestFailed, Serving, raise_for

if TYPE_CHECKING:
    from modelserve.engine.frontend import RequestStream
    from modelserve.engine.request import Request
    from modelserve.telemetry.request_outcome import OutcomeTracker

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.STOP_TOKEN: "stop",
}


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


class Layout:
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


class Generation(Response):
    """One generation, run while Starlette sends this response: submitted, streamed or collected, and
    aborted if the client goes away. Counted in flight from before the engine sees it to its last byte,
    so a drain waits for it."""

    def __init__(
        self,
        serving: Serving,
        start: Callable[[], tuple[Request, RequestStream]],
        prompt: str,
        layout: Layout,
        stream: bool,
        names: Mapping[str, str],
    ) -> None:
        super().__init__()
        self._serving, self._start, self._prompt = serving, start, prompt
        self._layout, self._stream, self._names = layout, stream, names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._serving.counted():
            try:
                request, stream = self._start()  # readiness again (a drain may have begun), then submit
            except RequestFailed as exc:
                await failure(exc, self._names).response()(scope, receive, send)
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
            error = failure(exc, self._names)
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
            last = _sse(failure(exc, self._names).body())
        await send({"type": "http.response.body", "body": last, "more_body": False})
