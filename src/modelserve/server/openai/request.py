"""Reading an OpenAI request: a chat or completion body becomes the one parameter model, which then meets
the shared validation and limits (serving.py, validation.py) as a gRPC call's do, and the caller's deadline
comes from the X-Request-Timeout-S header (in seconds). A body is read with OpenAI's types; the fields that
ask for what this server cannot do (unserved.py's table) are refused by name, and fields it does not know
are logged once and ignored (unserved.py).

A refusal keeps its gRPC meaning, mapped onto an HTTP status in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}, with the gRPC status's name as `code`, and in the body's
own field names: validation speaks of params.max_new_tokens, the caller sent max_tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import grpc
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from modelserve.server.core.chat import ChatMessage
from modelserve.server.core.params import Parameters, StructuredOutput
from modelserve.server.core.serving import RequestFailed
from modelserve.server.core.tools import Tool, ToolCall, ToolChoice, ToolError, check_tools
from modelserve.server.core.unserved import STRUCTURAL_TAGS, openai_refusal
from modelserve.server.core.validation import VLLM_NAMES, reworded

TIMEOUT_HEADER = "x-request-timeout-s"  # the caller's deadline, in seconds from now (gRPC sends its own)
SEED_MAX = 2**64 - 1  # as modelserve.v1's seed, a uint64

# A refusal's gRPC status -> its HTTP status and OpenAI error type.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # the model has no chat template
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),  # a model (or LoRA adapter) not served
    grpc.StatusCode.ALREADY_EXISTS: (400, "invalid_request_error"),  # a LoRA adapter's name taken (as vLLM)
}
# A refusal that starts with one of these names the field it is about (its `param`).
_LEADING_FIELD = re.compile(r"^(prompt|priority|messages(?:\[\d+\])?(?:\.[a-z]+)?)")


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


def invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_argument")


def failure(exc: RequestFailed, names: Mapping[str, str]) -> ApiError:
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
    """Validation names the parameter model's fields (params.max_new_tokens); this caller sent the body's
    (max_tokens): the message in the body's names, and the field it names first."""
    text, renamed = reworded(message, lambda ours: names.get(ours or "prompt", ours or "prompt"))
    leading = _LEADING_FIELD.match(message)
    if leading is not None:
        return text, names.get(leading[1], leading[1])
    return text, renamed[0] if renamed else None


class Body:
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
            raise invalid(f"{key} must be {what}, got {json.dumps(value)[:80]}", key)
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
            raise invalid(f"{key} must be a string or a list of strings", key)
        return items

    def integers(self, key: str) -> list[int]:
        value = self.typed(key, (list,), "a list of integers") or []
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise invalid(f"{key} must be a list of integers", key)
        return list(value)

    def array(self, key: str) -> list[Any] | None:
        value: list[Any] | None = self.typed(key, (list,), "a list")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] | None = self.typed(key, (dict,), "an object")
        return value or {}

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field that asks for what this server does not do (unserved.py's table)."""
        refusal = openai_refusal(self._data)
        if refusal is not None:
            raise invalid(refusal[1], refusal[0])


def generation_parameters(body: Body, chat: bool) -> tuple[Parameters, dict[str, str]]:
    """The body's sampling fields in the one parameter model (validated later, by the shared request path),
    and the body's name of each field, for that path's messages: vLLM's names where ours differ
    (validation.py), and the request's own choice (max_completion_tokens, a completion's `logprobs` count)."""
    fields: dict[str, Any] = {}
    names = dict(VLLM_NAMES)

    def put(field: str, key: str, value: object) -> None:
        if value is not None:
            names[field] = key
            fields[field] = value

    max_key = "max_completion_tokens" if chat and body.has("max_completion_tokens") else "max_tokens"
    put("max_new_tokens", max_key, body.integer(max_key))
    put("min_new_tokens", "min_tokens", body.integer("min_tokens"))
    put("temperature", "temperature", body.number("temperature"))
    put("top_p", "top_p", body.number("top_p"))
    put("top_k", "top_k", body.integer("top_k"))
    put("repetition_penalty", "repetition_penalty", body.number("repetition_penalty"))
    put("presence_penalty", "presence_penalty", body.number("presence_penalty"))
    put("frequency_penalty", "frequency_penalty", body.number("frequency_penalty"))
    put("min_p", "min_p", body.number("min_p"))
    fields["logit_bias"] = tuple(sorted(_logit_bias(body).items()))
    put("ignore_eos", "ignore_eos", body.boolean("ignore_eos"))
    put("include_stop_sequence", "include_stop_str_in_output", body.boolean("include_stop_str_in_output"))
    put("truncate_input_tokens", "truncate_prompt_tokens", body.integer("truncate_prompt_tokens"))
    seed = body.integer("seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise invalid(f"seed must be in [0, {SEED_MAX}], got {seed}", "seed")
    put("seed", "seed", seed)
    fields["stop"] = tuple(body.strings("stop"))
    fields["stop_token_ids"] = tuple(body.integers("stop_token_ids"))
    if chat:  # logprobs: true, top_logprobs: n
        put("logprobs", "logprobs", body.boolean("logprobs"))
        put("top_logprobs", "top_logprobs", body.integer("top_logprobs"))
    else:  # logprobs: n, the alternatives per token (0: the chosen token's only)
        top = body.integer("logprobs")
        if top is not None:
            fields["logprobs"] = True
            put("top_logprobs", "logprobs", top)
            if body.boolean("echo"):  # the echoed prompt's tokens get theirs too
                put("prompt_logprobs", "logprobs", top)
    put("prompt_logprobs", "prompt_logprobs", body.integer("prompt_logprobs"))
    fields["structured_output"] = _structured_output(body, names)
    return Parameters(**fields), names


def _structured_output(body: Body, names: dict[str, str]) -> StructuredOutput | None:
    """OpenAI's response_format, and vLLM's guided_* fields and structured_outputs object, as one structured
    output (at most one of them may be asked for); validation checks the schema, regex or grammar."""
    asked: list[tuple[str, str, Any]] = []  # (the body field, our kind, its value)
    response_format = body.mapping("response_format")
    kind = response_format.get("type", "text")
    if kind == "json_object":
        asked.append(("response_format", "json_object", True))
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema must be a JSON schema (an object)", "response_format")
        asked.append(("response_format", "json_schema", schema))
    elif kind == "structural_tag":
        raise invalid(f"response_format structural_tag is not supported: {STRUCTURAL_TAGS.reason}", "response_format")
    elif kind != "text":
        raise invalid(
            f"response_format type {json.dumps(kind)[:40]} is not supported: text, json_object or json_schema",
            "response_format",
        )
    for key, ours in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice")):
        if body.has(key):
            asked.append((key, ours, body.typed(key, (dict, str, list), "a schema, a string or a list")))
    if body.has("guided_grammar"):
        asked.append(("guided_grammar", "grammar", body.string("guided_grammar")))
    outputs = body.mapping("structured_outputs")
    if "structural_tag" in outputs:
        raise invalid(
            f"structured_outputs.structural_tag is not supported: {STRUCTURAL_TAGS.reason}", "structured_outputs"
        )
    for key, ours in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
        if outputs.get(key) is not None:
            asked.append(("structured_outputs", ours, outputs[key]))
    if outputs.get("json_object"):
        asked.append(("structured_outputs", "json_object", True))
    if len(asked) > 1:
        fields = ", ".join(sorted({f"{key} ({ours})" for key, ours, _ in asked}))
        raise invalid(f"ask for one structured output at a time; this request asks for {fields}", asked[1][0])
    if not asked:
        return None
    key, ours, value = asked[0]
    names[f"structured_output.{ours}"] = key
    if ours == "json_schema":
        if not isinstance(value, dict | str):
            raise invalid(f"{key} must be a JSON schema (an object, or its JSON text)", key)
        return StructuredOutput(ours, value if isinstance(value, str) else json.dumps(value))
    if ours == "choice":
        if not isinstance(value, list) or not all(isinstance(choice, str) for choice in value):
            raise invalid(f"{key} must be a list of strings", key)
        return StructuredOutput(ours, tuple(value))
    if ours == "json_object":
        return StructuredOutput(ours, True)
    if not isinstance(value, str):
        raise invalid(f"{key} must be a string", key)
    return StructuredOutput(ours, value)


def _logit_bias(body: Body) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings), each mapped to a number."""
    biases = {}
    for key, value in body.mapping("logit_bias").items():
        if re.fullmatch(r"-?[0-9]+", key) is None:
            raise invalid(f"logit_bias keys must be token ids (integers), got {key[:40]!r}", "logit_bias")
        token_id = int(key)
        if not -(2**31) <= token_id < 2**31:
            raise invalid(f"logit_bias key {key} is out of range", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"logit_bias[{key}] must be a number, got {json.dumps(value)[:80]}", "logit_bias")
        biases[token_id] = float(value)
    return biases


def chat_messages(body: Body) -> list[ChatMessage]:
    raw = body.array("messages")
    if raw is None:
        raise invalid("messages is required: a list of {role, content} objects", "messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object with role and content", where)
        role = item.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role must be a string", f"{where}.role")
        calls = _tool_calls(item.get("tool_calls"), f"{where}.tool_calls")
        call_id = item.get("tool_call_id") or ""
        if not isinstance(call_id, str):
            raise invalid(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        messages.append(ChatMessage(role, _content(item.get("content"), f"{where}.content"), calls, call_id))
    return messages


def _tool_calls(raw: object, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's earlier calls, sent back with the tools' results."""
    if not raw:
        return ()
    if not isinstance(raw, list):
        raise invalid(f"{where} must be a list of tool calls", where)
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str | dict):
            raise invalid(
                f"{where}[{j}] must be {{id, type: function, function: {{name, arguments}}}}", f"{where}[{j}]"
            )
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ToolCall(str(call.get("id") or ""), name, text))
    return tuple(calls)


def chat_tools(body: Body) -> tuple[list[Tool], ToolChoice]:
    """The body's `tools` and `tool_choice` (OpenAI's: none, auto, required or {type: function, function:
    {name}}), checked; auto when tools are given and tool_choice is not."""
    tools = []
    for i, item in enumerate(body.array("tools") or []):
        function = (
            item.get("function") if isinstance(item, dict) and item.get("type", "function") == "function" else None
        )
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(
                f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}", "tools"
            )
        description = function.get("description") or ""
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function: description must be a string and parameters an object", "tools")
        tools.append(Tool(function["name"], description, parameters))
    raw = body.typed("tool_choice", (str, dict), "none, auto, required or {type: function, function: {name}}")
    mode, named = "auto", ""
    if isinstance(raw, str):
        mode = raw
    elif isinstance(raw, dict):
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if raw.get("type") != "function" or not isinstance(name, str) or not name:
            raise invalid(
                "tool_choice must be none, auto, required or {type: function, function: {name}}", "tool_choice"
            )
        named = name
    parallel = body.boolean("parallel_tool_calls")
    try:
        return tools, check_tools(tools, mode, named, parallel is not False)
    except ToolError as exc:
        raise invalid(str(exc), "tool_choice" if "tool_choice" in str(exc) else "tools") from None


def _content(content: object, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are taken."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = json.dumps(kind) if isinstance(part, dict) else "not an object"
            raise invalid(
                f"{where}[{j}] must be a text part ({{'type': 'text', 'text': ...}}); got type {got}: this "
                "server takes text only",
                f"{where}[{j}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def completion_prompts(body: Body, most: int) -> list[str | list[int]]:
    """A completion's prompts, as OpenAI takes them: a string, a list of token ids, or a list of 1 to `most`
    of either (one choice each)."""
    value = body.typed("prompt", (str, list), "a string, a list of token ids, or a list of those")
    if isinstance(value, list) and value and all(_is_token_id(t) for t in value):
        value = [value]  # one prompt as token ids
    prompts = [value] if isinstance(value, str) else value
    if prompts is None or not all(
        isinstance(p, str) or (isinstance(p, list) and p and all(_is_token_id(t) for t in p)) for p in prompts
    ):
        raise invalid("prompt must be a string, a non-empty list of token ids (integers), or a list of those", "prompt")
    if not 1 <= len(prompts) <= most:
        raise invalid(f"prompt has {len(prompts)} items; a list must have 1 to {most} (--max-batch-requests)", "prompt")
    return prompts


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def request_timeout_s(request: HttpRequest) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise invalid(f"the X-Request-Timeout-S header must be a positive number of seconds, got {raw!r}", None)
    return value
