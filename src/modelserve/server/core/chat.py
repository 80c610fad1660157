"""Chat messages into one prompt, laid out by the model's own chat template.

A chat model is trained on conversations laid out by its chat template (a Jinja
template that ships with its tokenizer); any other layout gives it text it never
saw, so Chat renders only with the model's template, or with the one the operator
names with --chat-template FILE. Rendering is transformers' own sandboxed Jinja
(`render_jinja_template`, what `apply_chat_template` runs), with the tokenizer's
special tokens (bos_token, eos_token, ...) in its context and the generation
prompt added, so a prompt here is the prompt transformers would make.

Tokenizing: the template owns the special tokens. One that starts with bos_token
has already put BOS into the text, and a tokenizer that adds BOS itself would add
a second, which degrades a model's answers without any error. So a chat prompt
is tokenized without the tokenizer's special tokens (`add_special_tokens=False`),
as apply_chat_template does; a Generate prompt keeps them, since no template
wrote them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jinja2.exceptions import TemplateSyntaxError

from modelserve.server.core.tools import Tool, ToolCall

if TYPE_CHECKING:
    from modelserve.models.loader import ModelInfo

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# An assistant turn may be empty (a reply that produced no text), as may a tool's result; a user or system
# message without text is a caller's mistake.
_EMPTY_ALLOWED = frozenset({"assistant", "tool"})


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat, as the template reads it (`message['role']`, `message['content']`, and an
    assistant's `tool_calls` or a tool result's `tool_call_id`)."""

    role: str  # one of ROLES
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls (tools.py)
    tool_call_id: str = ""  # a tool message: the call it answers

    def as_template_reads_it(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:  # arguments as an object: templates write them with tojson
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatError(ValueError):
    """A chat that cannot be rendered; str(exc) is what the caller is told.

    `code` says whose problem it is: "no_template" (the server's: the model has no chat
    template), "invalid" (the caller's: the messages, or the template refused them).
    """

    def __init__(self, code: Literal["no_template", "invalid"], message: str) -> None:
        super().__init__(message)
        self.code = code


def render_chat(model: ModelInfo, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> str:
    """The prompt text for `messages` (and the `tools` the model may call, as the template lays them out), with
    the generation prompt added; ChatError when it cannot be made.

    Tokenize it with `model.encode(text, add_special_tokens=False)` (the module docstring says why); bound
    `messages` first with `check_chat_size`.
    """
    template = model.chat_template
    if template is None:
        raise ChatError(
            "no_template",
            f"the model {model.model_id} has no chat template; start the server with --chat-template FILE",
        )
    _check_messages(messages)
    context: dict[str, Any] = {f"{role}_token": token for role, token, _ in model.special_tokens}
    if tools:
        context["tools"] = [tool.as_openai() for tool in tools]
    conversation = [m.as_template_reads_it() for m in messages]
    try:
        return _render(template, conversation, context)
    # raise_exception() in the template, what it read was not there, or its own code failing on this chat (a
    # TypeError, say): the chat is what the template refuses, not a fault of the server.
    except Exception as exc:
        i = _first_refused(template, conversation, context)
        raise ChatError(
            "invalid", f"messages[{i}] (role {messages[i].role!r}): the model's chat template refuses it: {exc}"
        ) from None


def check_chat_size(messages: Sequence[ChatMessage], max_prompt_bytes: int) -> None:
    """ChatError unless the messages' roles and contents fit in `max_prompt_bytes` (Generate's prompt limit).

    Checked before rendering, so that a huge chat (of many empty messages, too: each role counts) costs no
    rendering; the rendered prompt is then bounded as any prompt is, since the template adds text.
    """
    size = sum(
        _utf8_size(m.role)
        + _utf8_size(m.content)
        + sum(_utf8_size(c.name) + _utf8_size(c.arguments) for c in m.tool_calls)
        for m in messages
    )
    if size > max_prompt_bytes:
        raise ChatError(
            "invalid", f"messages are {size} bytes (roles and contents); the limit is {max_prompt_bytes} bytes"
        )


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _check_messages(messages: Sequence[ChatMessage]) -> None:
    if not messages:
        raise ChatError("invalid", "messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ChatError("invalid", f"messages[{i}].role {message.role!r} is not one of {', '.join(ROLES)}")
        if message.tool_calls and message.role != "assistant":
            raise ChatError("invalid", f"messages[{i}].tool_calls: only an assistant message makes tool calls")
        if not message.content and message.role not in _EMPTY_ALLOWED:
            raise ChatError("invalid", f"messages[{i}].content is empty; only assistant and tool messages may be")


def _render(template: str, conversation: list[dict[str, Any]], context: dict[str, Any]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[conversation], chat_template=template, add_generation_prompt=True, **context
    )
    return str(rendered[0])


def _first_refused(template: str, conversation: list[dict[str, Any]], context: dict[str, Any]) -> int:
    """The index of the message whose addition makes the template fail (the whole chat fails).

    Exact for templates that check each message as they reach it (roles must alternate, no system
    role): a chat fails from that message on. Bisected, so a long chat costs log2(n) renders.
    """
    good, bad = 0, len(conversation)  # the first `good` messages render (none: assumed), the first `bad` do not
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            _render(template, conversation[:mid], context)
        except Exception:
            bad = mid
        else:
            good = mid
    return bad - 1


def _syntax_error(template: str) -> str | None:
    """Why `template` does not compile, or None; checked at start-up, so that a broken template fails
    there and not as a caller's error on every Chat."""
    try:
        _render(template, [{"role": "user", "content": "Hello"}], {})
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    except Exception:  # a template may refuse this chat, or need tokens it is not given here: it compiles
        return None
    return None


def with_chat_template(model: ModelInfo, template_file: str) -> ModelInfo:
    """`model` with the template Chat renders with: `template_file`'s (--chat-template) when given, in place
    of the model's own; ValueError, one line, for a file that cannot be read or does not compile. A model's
    own template that does not compile is dropped with a warning: Generate still serves."""
    if template_file:
        try:
            template = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"--chat-template {template_file}: cannot read it: {reason}") from exc
        if not template.strip():
            raise ValueError(f"--chat-template {template_file}: the file is empty")
        error = _syntax_error(template)
        if error is not None:
            raise ValueError(f"--chat-template {template_file}: not a valid Jinja template: {error}")
        log.info("chat template: %s (--chat-template)", template_file)
        return dataclasses.replace(model, chat_template=template)
    if model.chat_template is None:
        log.info("the model has no chat template: Chat answers FAILED_PRECONDITION unless --chat-template FILE")
        return model
    error = _syntax_error(model.chat_template)
    if error is not None:
        log.warning(
            "the model's chat template does not compile (%s): Chat answers FAILED_PRECONDITION unless "
            "--chat-template FILE",
            error,
        )
        return dataclasses.replace(model, chat_template=None)
    log.info("chat template: the model's own")
    return model
