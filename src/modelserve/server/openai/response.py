"""Writing the answer: an engine stream as OpenAI's chat.completion or text_completion objects, whole, or
streamed as server-sent events (chat.completion.chunk) ending `data: [DONE]`, with `usage` and the
log-probabilities in OpenAI's layout. A refusal before the answer starts is an error response of OpenAI's
shape (request.py); a failure after a stream's first byte is sent as a last event of that shape
(what the openai client raises as APIError).

A client that closes its connection aborts its generation at the next engine step, as a cancelled gRPC
stream does: every generation watches the ASGI disconnect message while it runs, streamed or not.

A list of prompts (/v1/completions), and `n` samples of each, are one engine request per choice, run side
by side: `index` in OpenAI's order (prompt by prompt, a prompt's samples together), streamed as their
events come (each chunk names its choice), usage with each prompt once. One choice refused refuses the
whole request, and one failing ends it, as OpenAI's API does.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from modelserve.engine.request import FinishReason, StreamEvent, TokenLogprob, TokenLogprobs
from modelserve.server.core.serving import RequestFailed, Serving, raise_for
from modelserve.server.core.tools import HeldReply, ToolCall, ToolCalling
from modelserve.server.openai.request import failure

if TYPE_CHECKING:
    from modelserve.engine.frontend import RequestStream
    from modelserve.engine.request import Request

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.STOP_TOKEN: "stop",
}


def _finite(logprob: float) -> float:
    """JSON has no NaN or infinity; OpenAI writes an impossible token's log-probability as -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


def _usage(ends: Sequence[tuple[Request, StreamEvent]], samples: int) -> dict[str, Any]:
    """OpenAI's usage for every choice together: each prompt counted once (with its first sample's cached
    tokens; its other samples share its blocks), every choice's output."""
    firsts = ends[::samples]
    prompt = sum(len(request.prompt_ids) for request, _ in firsts)
    output = sum(event.output_tokens for _, event in ends)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": sum(event.cached_tokens for _, event in firsts)},
    }


@dataclass(frozen=True)
class Prompt:
    """A choice's prompt as the answer shows it: its text (echo), its first token's text, and the other
    tokens' log-probabilities (echo with logprobs, or prompt_logprobs)."""

    text: str
    first_token: str
    scored: Sequence[TokenLogprobs]


@dataclass(frozen=True)
class Answer:
    """A whole choice."""

    text: str
    logprobs: Sequence[TokenLogprobs]
    finish_reason: str
    prompt: Prompt | None  # when echo or prompt_logprobs asks for it


def _openai_calls(calls: Sequence[ToolCall], streamed: bool) -> list[dict[str, Any]]:
    return [
        {
            **({"index": i} if streamed else {}),
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


class Layout:
    """Where a request's text, log-probabilities and endings go, choice by choice: chat.completion(.chunk)
    objects, or text_completion ones. A completion's `echo` starts each choice with its prompt (and, with
    `logprobs`, the prompt tokens' log-probabilities, the first token's null); `prompt_logprobs` (vLLM's)
    adds them in vLLM's shape, per choice for a completion, for the answer in a chat."""

    def __init__(
        self,
        chat: bool,
        model_id: str,
        logprobs: bool,
        include_usage: bool,
        echo: bool,
        prompt_logprobs: bool,
        calling: ToolCalling | None = None,
    ) -> None:
        self.chat, self.logprobs, self.include_usage = chat, logprobs, include_usage
        self.echo, self.prompt_logprobs = echo, prompt_logprobs
        self._calling = calling
        self._held: dict[int, HeldReply] = {}  # a streamed chat choice's text held back while it may be a call
        self._id = ""
        self._object = "chat.completion" if chat else "text_completion"
        self._model_id = model_id
        self._created = int(time.time())
        self._text_offsets: dict[int, int] = {}  # a completion's logprobs say where each token starts in the text

    def begin(self, request_id: str) -> None:
        """Name the answer after its (first) request, once the shared path has given it an id."""
        self._id = ("chatcmpl-" if self.chat else "cmpl-") + request_id

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = self._object + (".chunk" if chunk and self.chat else "")
        envelope = {"id": self._id, "object": kind, "created": self._created, "model": self._model_id}
        envelope["choices"] = choices
        if chunk and self.include_usage:
            envelope["usage"] = None  # as OpenAI: only the last chunk carries it
        return envelope

    def opening(self, count: int) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        choices = [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None} for i in range(count)]
        return [self._envelope(choices, True)]

    def piece(self, index: int, text: str, logprobs: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
        """The chunk for an event's text (none while all of it is held back as a possible tool call)."""
        if self._calling is not None:
            text = self._held.setdefault(index, HeldReply(self._calling)).feed(text)
            if not text and not logprobs:
                return []
        key, value = ("delta", {"content": text}) if self.chat else ("text", text)
        choice = {"index": index, key: value, "logprobs": self._logprobs(index, logprobs), "finish_reason": None}
        return [self._envelope([choice], True)]

    def echoed(self, index: int, prompt: Prompt) -> dict[str, Any]:
        """A streamed completion choice's first chunk under echo: its prompt."""
        logprobs = self._prompt_logprobs(index, prompt) if self.logprobs else None
        choice = {"index": index, "text": prompt.text, "logprobs": logprobs, "finish_reason": None}
        return self._envelope([choice], True)

    def ending(self, index: int, reason: str) -> list[dict[str, Any]]:
        """A choice's last chunks: what was held back (its text, or the tool calls it turned out to be), then
        the finish reason."""
        chunks = []
        held = self._held.pop(index, None)
        if held is not None:
            content, calls = held.finish(complete=reason == "stop")
            delta: dict[str, Any] = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = _openai_calls(calls, streamed=True)
                reason = "tool_calls"
            if delta:
                chunks.append(
                    self._envelope([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}], True)
                )
        key, value = ("delta", {}) if self.chat else ("text", "")
        chunks.append(self._envelope([{"index": index, key: value, "logprobs": None, "finish_reason": reason}], True))
        return chunks

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([], True), "usage": usage}

    def whole(self, answers: Sequence[Answer], usage: dict[str, Any]) -> dict[str, Any]:
        """Every choice, in order."""
        choices = []
        for index, answer in enumerate(answers):
            text, prompt = answer.text, answer.prompt
            echoed = None
            if self.echo and prompt is not None:
                text = prompt.text + text
                echoed = self._prompt_logprobs(index, prompt) if self.logprobs else None
            lps = self._logprobs(index, answer.logprobs)
            if echoed is not None and lps is not None:
                lps = {key: echoed[key] + lps[key] for key in lps}
            reason = answer.finish_reason
            value: str | dict[str, Any] = {"role": "assistant", "content": text} if self.chat else text
            key = "message" if self.chat else "text"
            if self._calling is not None:
                content, calls = self._calling.split(text, complete=reason == "stop")
                if calls:
                    value = {"role": "assistant", "content": content or None, "tool_calls": _openai_calls(calls, False)}
                    reason = "tool_calls"
            choice: dict[str, Any] = {"index": index, key: value, "logprobs": lps, "finish_reason": reason}
            if self.prompt_logprobs and not self.chat:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(prompt)
            choices.append(choice)
        whole = {**self._envelope(choices, False), "usage": usage}
        if self.prompt_logprobs and self.chat:
            whole["prompt_logprobs"] = _vllm_prompt_logprobs(answers[0].prompt)
        return whole

    def _prompt_logprobs(self, index: int, prompt: Prompt) -> dict[str, Any]:
        """A completion's logprobs object for the echoed prompt: its first token's values null; the output's
        text offsets go on after the prompt's text."""
        tokens = [prompt.first_token, *(lp.chosen.token for lp in prompt.scored)]
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        self._text_offsets[index] = len(prompt.text)
        return {
            "tokens": tokens,
            "token_logprobs": [None, *(_finite(lp.chosen.logprob) for lp in prompt.scored)],
            "top_logprobs": [None, *({t.token: _finite(t.logprob) for t in lp.top} for lp in prompt.scored)],
            "text_offset": offsets,
        }

    def _logprobs(self, index: int, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:

            def one(t: TokenLogprob) -> dict[str, Any]:
                return {"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.token.encode())}

            return {"content": [{**one(lp.chosen), "top_logprobs": [one(t) for t in lp.top]} for lp in logprobs]}
        offsets = []
        offset = self._text_offsets.get(index, 0)
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.chosen.token)
        self._text_offsets[index] = offset
        return {
            "tokens": [lp.chosen.token for lp in logprobs],
            "token_logprobs": [_finite(lp.chosen.logprob) for lp in logprobs],
            "top_logprobs": [{t.token: _finite(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


def _vllm_prompt_logprobs(prompt: Prompt | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's prompt_logprobs: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and its alternatives."""
    if prompt is None:
        return None

    def one(t: TokenLogprob) -> dict[str, Any]:
        return {"logprob": _finite(t.logprob), "rank": t.rank, "decoded_token": t.token}

    entries: list[dict[str, dict[str, Any]] | None] = [None]
    for lp in prompt.scored:
        entries.append({str(lp.chosen.token_id): one(lp.chosen), **{str(t.token_id): one(t) for t in lp.top}})
    return entries


def _cancelled() -> FinishReason:
    return FinishReason.CANCELLED


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _watch_disconnect(receive: Receive, streams: Sequence[RequestStream], gone: asyncio.Event) -> None:
    """Abort the generation (at the engine's next step) once the client closes its connection."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    for stream in streams:
        stream.abort(FinishReason.CANCELLED)


Started: TypeAlias = tuple["Request", "RequestStream"]


class Generation(Response):
    """One request's generations (one per choice: a list of prompts, or n samples, has several; `prompts`
    holds each choice's prompt, `samples` choices in a row per prompt), run while Starlette sends
    this response: submitted, streamed or collected, and aborted if the client goes away. Counted in flight
    from before the engine sees them to the last byte, so a drain waits for them."""

    def __init__(
        self,
        serving: Serving,
        start: Callable[[], Awaitable[list[Started]]],
        prompts: Sequence[str],
        samples: tuple[int, int],
        layout: Layout,
        stream: bool,
        names: Mapping[str, str],
        answer_id: str | None = None,
        decode: Callable[[Sequence[int]], str] = str,
    ) -> None:
        """`samples`: (generated, returned) per prompt: best_of and n; the n with the highest cumulative
        log-probability are returned. `answer_id` names the answer (the X-Request-Id echoed); None: the one
        request's own id."""
        super().__init__()
        self._answer_id = answer_id
        self._serving, self._start, self._prompts = serving, start, prompts
        self._samples, self._keep = samples
        self._layout, self._stream, self._names = layout, stream, names
        self._decode = decode  # token ids' text, for an echoed prompt sent as ids and its first token

    def _prompt(self, started: Started, prompt: str, event: StreamEvent) -> Prompt:
        """The choice's prompt as sent (its text, or its tokens' text), from its first event."""
        ids = started[0].prompt_ids
        text = prompt or self._decode(ids)
        return Prompt(text, self._decode(ids[:1]), event.prompt_logprobs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._serving.counted():
            try:
                started = await self._start()  # readiness again (a drain may have begun), then submit
            except RequestFailed as exc:  # one prompt refused: none is served
                await failure(exc, self._names).response()(scope, receive, send)
                return
            gone = asyncio.Event()
            streams = [stream for _, stream in started]
            watcher = asyncio.ensure_future(_watch_disconnect(receive, streams, gone))
            chat = self._layout.chat
            try:
                # What is unfinished when the answer ends (a gone client, a failed choice) was cancelled.
                async with self._serving.consuming(started, self._prompts, chat, _cancelled) as events:
                    answer_id = self._answer_id or started[0][0].request_id
                    self._layout.begin(answer_id)
                    headers = {"x-request-id": answer_id}
                    if self._stream:
                        await self._send_events(send, started, events, gone, headers)
                    else:
                        response = await self._collect(started, events, gone, headers)
                        if response is not None:
                            await response(scope, receive, send)
            finally:
                watcher.cancel()

    async def _collect(
        self,
        started: Sequence[Started],
        events: AsyncGenerator[tuple[int, StreamEvent], None],
        gone: asyncio.Event,
        headers: dict[str, str],
    ) -> Response | None:
        """The whole answer, or its error; None when the client went away."""
        texts: list[list[str]] = [[] for _ in started]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in started]
        prompts: list[Prompt | None] = [None] * len(started)
        ends: dict[int, StreamEvent] = {}
        try:
            async for index, event in events:
                if gone.is_set():
                    return None
                if prompts[index] is None:
                    prompts[index] = self._prompt(started[index], self._prompts[index], event)
                texts[index].append(event.text)
                logprobs[index].extend(event.logprobs)
                if event.finish is not None:
                    raise_for(event)
                    ends[index] = event
        except RequestFailed as exc:
            await events.aclose()  # the other choices stop now, not after the error is sent
            error = failure(exc, self._names)
            return JSONResponse(error.body(), error.status, {**headers, **error.headers})
        assert len(ends) == len(started), "a request stream ends with its finish event"
        answers: list[Answer] = []
        for first in range(0, len(started), self._samples):  # each prompt's samples, the best `keep` of them
            candidates = list(range(first, first + self._samples))
            if self._keep < self._samples:
                candidates.sort(key=lambda i: -sum(lp.chosen.logprob for lp in logprobs[i]))
            for index in candidates[: self._keep]:
                finish = ends[index].finish
                assert finish is not None
                reason = _FINISH_REASONS[finish.reason]
                answers.append(Answer("".join(texts[index]), logprobs[index], reason, prompts[index]))
        usage = _usage([(started[i][0], ends[i]) for i in range(len(started))], self._samples)
        return JSONResponse(self._layout.whole(answers, usage), headers=headers)

    async def _send_events(
        self,
        send: Send,
        started: Sequence[Started],
        events: AsyncGenerator[tuple[int, StreamEvent], None],
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

        ends: dict[int, StreamEvent] = {}
        echoed: set[int] = set()
        try:
            for chunk in layout.opening(len(started)):
                await event(chunk)
            async for index, engine_event in events:
                if gone.is_set():
                    return
                if layout.echo and index not in echoed:
                    echoed.add(index)
                    await event(layout.echoed(index, self._prompt(started[index], self._prompts[index], engine_event)))
                if engine_event.text or engine_event.logprobs:
                    for chunk in layout.piece(index, engine_event.text, engine_event.logprobs):
                        await event(chunk)
                if engine_event.finish is not None:
                    raise_for(engine_event)
                    ends[index] = engine_event
                    for chunk in layout.ending(index, _FINISH_REASONS[engine_event.finish.reason]):
                        await event(chunk)
            if layout.include_usage:
                ends_in_order = [(started[i][0], ends[i]) for i in range(len(started))]
                await event(layout.usage(_usage(ends_in_order, self._samples)))
            last = b"data: [DONE]\n\n"
        except RequestFailed as exc:
            await events.aclose()  # the other choices stop now, not after the error is sent
            last = _sse(failure(exc, self._names).body())
        await send({"type": "http.response.body", "body": last, "more_body": False})
