"""Tool calling in a chat: the caller's tools and tool_choice, checked; the model's tool-call text parsed
into tool calls; and, for `required` or a named function, the structured output that makes the model
write one.

Each family writes its calls its own way, and the parser follows the model's chat template (or the
server's --tool-call-parser):

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen 2.5 and 3 and Hermes write;
- llama3_json: the reply is a JSON object `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` if
  the model writes it), or several separated by `;`, as Llama 3.1 to 3.3 write;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

With tool_choice `auto` the model decides; text that parses as no call stays the answer's content. With
`required` the reply is constrained to a JSON array of one or more `{"name", "parameters"}` objects of the
given tools, and with a named function to that function's arguments, as vLLM does: the call is then
parsed from that JSON whatever the family. Written here: the parsers are a few regular expressions and
json.loads, which no library of the field offers apart from a whole server.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("none", "auto", "required")
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ToolError(ValueError):
    """The caller's tools or tool_choice are not valid; the message says which and why."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema of the arguments

    def as_openai(self) -> dict[str, Any]:
        """The tool as chat templates read it (OpenAI's shape)."""
        function = {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # none, auto or required
    function: str = ""  # a named function that must be called (mode required)
    parallel: bool = True  # more than one call in a reply (OpenAI's parallel_tool_calls)


def check_tools(tools: Sequence[Tool], mode: str, function: str = "", parallel: bool = True) -> ToolChoice:
    """The tool choice for these tools; ToolError naming what is wrong."""
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools has {len(tools)} functions; at most {MAX_TOOLS}")
    names = [tool.name for tool in tools]
    for i, tool in enumerate(tools):
        if not _NAME.fullmatch(tool.name):
            raise ToolError(f"tools[{i}].name {tool.name[:80]!r} must be 1 to 64 letters, digits, '_', '.' or '-'")
        if names.index(tool.name) != i:
            raise ToolError(f"tools[{i}].name {tool.name!r} is given twice")
        if not isinstance(tool.parameters, Mapping):
            raise ToolError(f"tools[{i}].parameters must be a JSON schema (an object)")
    if mode not in MODES:
        raise ToolError(f"tool_choice must be one of {', '.join(MODES)} or a function, got {mode!r}")
    if function:
        if function not in names:
            known = ", ".join(names) or "none"
            raise ToolError(f"tool_choice names the function {function!r}, which is not in tools (they are: {known})")
        return ToolChoice("required", function, parallel)
    if mode == "required" and not tools:
        raise ToolError("tool_choice is required, but tools is empty")
    return ToolChoice(mode if tools else "none", parallel=parallel)


def parser_for(chat_template: str | None, configured: str = "auto") -> str:
    """The parser named by --tool-call-parser, or the one the chat template's own tokens say."""
    if configured != "auto":
        return configured
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def constraint_for(tools: Sequence[Tool], choice: ToolChoice) -> str | None:
    """The JSON schema (as text) a reply must follow: for `required`, an array of calls; for a named function
    (mode required too), its arguments. None when the model chooses (auto, none)."""
    if choice.function:
        tool = next(t for t in tools if t.name == choice.function)
        return json.dumps(dict(tool.parameters) or {"type": "object"})
    if choice.mode != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "parameters": dict(tool.parameters) or {"type": "object"}},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    bounds = {"minItems": 1} if choice.parallel else {"minItems": 1, "maxItems": 1}
    return json.dumps({"type": "array", **bounds, "items": {"anyOf": calls}})


def constrained_calls(text: str, choice: ToolChoice) -> list[ToolCall]:
    """The calls in a reply written under constraint_for's schema (complete: it ended with EOS)."""
    value = json.loads(text)
    if choice.function:
        return [_call(choice.function, value)]
    return [_call(item["name"], item["parameters"]) for item in value]


def parse(text: str, parser: str, tools: Sequence[Tool], parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(the content left, the calls) in a reply the model wrote by itself (tool_choice auto); the first call
    only unless `parallel`. Text that does not parse as calls of the given tools is all content, no calls."""
    content, calls = _parse(text, parser, tools)
    return content, calls if parallel else calls[:1]


def _parse(text: str, parser: str, tools: Sequence[Tool]) -> tuple[str, list[ToolCall]]:
    names = {tool.name for tool in tools}
    if parser == "hermes":
        found = list(re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL))
        calls = [_object_call(m[1], names, "arguments") for m in found]
        if found and all(call is not None for call in calls):
            content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.DOTALL).strip()
            return content, [call for call in calls if call is not None]
        return text, []
    if parser == "mistral":
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        try:
            items = json.loads(rest.strip())
        except ValueError:
            return text, []
        items = items if isinstance(items, list) else [items]
        mistral_calls = [_object_call(json.dumps(item), names, "arguments") for item in items]
        if items and all(call is not None for call in mistral_calls):
            return head.strip(), [call for call in mistral_calls if call is not None]
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()  # llama3_json
    if not body.startswith("{"):
        return text, []
    llama_calls = [_object_call(part, names, "parameters") for part in body.split(";") if part.strip()]
    if llama_calls and all(call is not None for call in llama_calls):
        return "", [call for call in llama_calls if call is not None]
    return text, []


def holds_back(text: str, parser: str) -> int:
    """Where in a streamed reply (tool_choice auto) a tool call may have begun: text from there on is held
    back until the reply ends and is parsed. len(text) when none may have."""
    if parser == "llama3_json":  # a call is the whole reply: hold it all until its first character says
        stripped = text.lstrip()
        may_be_call = stripped.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(stripped)
        return 0 if may_be_call else len(text)
    marker = "<tool_call>" if parser == "hermes" else "[TOOL_CALLS]"
    at = text.find(marker)
    if at >= 0:
        return at
    for size in range(min(len(marker) - 1, len(text)), 0, -1):  # a marker's start at the very end
        if marker.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def _object_call(text: str, names: set[str], arguments_key: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    return _call(value["name"], arguments)


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, text)


@dataclass(frozen=True)
class ToolCalling:
    """A chat that offers tools: how its replies become tool calls (tools.py)."""

    tools: Sequence[Tool]
    choice: ToolChoice
    parser: str

    def split(self, text: str, complete: bool) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole reply; `complete`: it ended by itself (not at its length limit)."""
        if self.choice.mode != "required":  # the model chose: read the calls as its family writes them
            return parse(text, self.parser, self.tools, self.choice.parallel)
        if not complete:  # cut short inside the constrained JSON: no call can be read from it
            return text, []
        try:
            return "", constrained_calls(text, self.choice)
        except (ValueError, KeyError, TypeError):
            return text, []

    def held_from(self, text: str) -> int:
        """Where a streamed reply's text must be held back from (the rest may be a call)."""
        return 0 if self.choice.mode == "required" else holds_back(text, self.parser)


class HeldReply:
    """One streamed reply of a chat with tools: its text is sent as it comes, except from where a call may
    have begun, which waits for the reply's end to be read as calls or sent as text."""

    def __init__(self, calling: ToolCalling) -> None:
        self._calling = calling
        self._held = ""

    def feed(self, text: str) -> str:
        """What of the reply so far may be sent now."""
        held = self._held + text
        cut = self._calling.held_from(held)
        self._held = held[cut:]
        return held[:cut]

    def finish(self, complete: bool) -> tuple[str, list[ToolCall]]:
        """At the reply's end: the held text left as content, and the calls it made."""
        held, self._held = self._held, ""
        return self._calling.split(held, complete) if held else ("", [])
