"""Tool calling in chats: the parsers on what each family writes, and the server through the official openai
client (tests/tool_template.jinja, a Hermes-style template, as Qwen's): tool_choice required and a named
function always give parseable calls whose arguments match their schema, streamed as tool-call deltas;
tool results go back in; a tool_choice naming an unknown function is a 400 naming it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from openai import OpenAI

from bench.harness import ServerProcess, start_server
from modelserve.engine.grammar import grammar_for
from modelserve.server.core.tools import (
    Tool,
    ToolChoice,
    ToolError,
    check_tools,
    constrained_calls,
    constraint_for,
    holds_back,
    parse,
    parser_for,
)

TEMPLATE = Path(__file__).with_name("tool_template.jinja")
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [Tool("get_weather", "The forecast for a city.", WEATHER), Tool("add", "The sum of two numbers.", ADD)]
SCHEMAS = {tool.name: tool.parameters for tool in TOOLS}
OPENAI_TOOLS: Any = [tool.as_openai() for tool in TOOLS]


# ---- the parsers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        (
            "hermes",
            'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
            "\n</tool_call>",
            "Let me look.",
            [("get_weather", {"city": "Oslo", "days": 2})],
        ),
        (
            "hermes",
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>',
            "",
            [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
        ),
        ("hermes", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', None, []),  # not one of the tools
        ("hermes", "<tool_call>{not json</tool_call>", None, []),
        ("llama3_json", '{"name": "add", "parameters": {"a": 5, "b": 6}}', "", [("add", {"a": 5, "b": 6})]),
        (
            "llama3_json",
            '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 1}}; '
            '{"name": "get_weather", "parameters": {"city": "Lima", "days": 1}}',
            "",
            [("add", {"a": 1, "b": 1}), ("get_weather", {"city": "Lima", "days": 1})],
        ),
        ("llama3_json", "The answer is {braces}.", None, []),
        (
            "mistral",
            'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 2}}]',
            "Sure.",
            [("add", {"a": 2, "b": 2})],
        ),
        ("mistral", "No calls here.", None, []),
    ],
)
def test_each_family_s_calls_are_parsed(
    parser: str, text: str, content: str | None, calls: list[tuple[str, Any]]
) -> None:
    got_content, got = parse(text, parser, TOOLS)
    assert got_content == (text if content is None else content)
    assert [(call.name, json.loads(call.arguments)) for call in got] == calls
    assert all(call.id.startswith("call_") for call in got) and len({call.id for call in got}) == len(got)


def test_streamed_text_is_held_back_from_where_a_call_may_begin() -> None:
    assert holds_back("Hello <tool_call>{", "hermes") == len("Hello ")
    assert holds_back("Hello <tool_", "hermes") == len("Hello ")  # a marker's start at the very end
    assert holds_back("Hello there", "hermes") == len("Hello there")
    assert holds_back("Fine. [TOOL_CALLS][", "mistral") == len("Fine. ")
    assert holds_back('  {"name"', "llama3_json") == 0 and holds_back("Plain text", "llama3_json") == len("Plain text")


def test_the_parser_follows_the_chat_template() -> None:
    assert parser_for("...[TOOL_CALLS]...") == "mistral"
    assert parser_for("...<|python_tag|>...") == "llama3_json"
    assert parser_for(TEMPLATE.read_text()) == "hermes" and parser_for(None) == "hermes"
    assert parser_for("[TOOL_CALLS]", "hermes") == "hermes"  # --tool-call-parser wins


def test_required_and_named_choices_constrain_to_valid_schemas() -> None:
    required = constraint_for(TOOLS, check_tools(TOOLS, "required"))
    named = constraint_for(TOOLS, check_tools(TOOLS, "auto", "add"))
    assert required is not None and named is not None and constraint_for(TOOLS, check_tools(TOOLS, "auto")) is None
    grammar_for("json_schema", required), grammar_for("json_schema", named)  # both compile
    calls = constrained_calls('[{"name": "add", "parameters": {"a": 1, "b": 2}}]', ToolChoice("required"))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert constrained_calls('{"a": 3, "b": 4}', ToolChoice("required", "add"))[0].name == "add"


@pytest.mark.parametrize(
    ("tools", "mode", "function", "why"),
    [
        (
            TOOLS,
            "auto",
            "multiply",
            "names the function 'multiply', which is not in tools (they are: get_weather, add)",
        ),
        (TOOLS, "sometimes", "", "tool_choice must be one of none, auto, required"),
        ([], "required", "", "tool_choice is required, but tools is empty"),
        ([Tool("bad name!", "", {})], "auto", "", "tools[0].name 'bad name!'"),
        ([TOOLS[1], TOOLS[1]], "auto", "", "tools[1].name 'add' is given twice"),
    ],
)
def test_bad_tools_and_choices_say_what_is_wrong(tools: list[Tool], mode: str, function: str, why: str) -> None:
    with pytest.raises(ToolError, match=re.escape(why)):
        check_tools(tools, mode, function)


# ---- through the server -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory.mktemp("tool-server"),
        "--model",
        str(model_dirs["llama"]),
        "--chat-template",
        str(TEMPLATE),
        "--max-batch-size",
        "8",
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


@pytest.fixture()
def client(tool_server: ServerProcess) -> Iterator[OpenAI]:
    base = f"http://127.0.0.1:{tool_server.http_port}/v1"
    with OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60) as client:
        yield client


MESSAGES: Any = [{"role": "user", "content": "What will the weather be in Oslo, and what is 2 + 3?"}]


def _check(calls: Any) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_always_yields_calls_with_valid_arguments(client: OpenAI) -> None:
    """One call each with parallel_tool_calls false; with it left on, a random model goes on calling for a
    while (it picks ',' over ']' as often as not), so those few get room."""
    model = client.models.list().data[0].id
    for seed in range(13):
        parallel = seed >= 10
        reply = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=OPENAI_TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            seed=seed,
            max_tokens=1200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check(choice.message.tool_calls)
        assert choice.message.tool_calls is not None and (parallel or len(choice.message.tool_calls) == 1)


def test_a_named_function_is_the_one_called_and_streams_as_tool_call_deltas(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    named: Any = {"type": "function", "function": {"name": "add"}}
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=OPENAI_TOOLS, tool_choice=named, seed=1
    )
    calls = reply.choices[0].message.tool_calls
    _check(calls)
    assert calls is not None and [c.function.name for c in calls] == ["add"]

    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, tools=OPENAI_TOOLS, tool_choice=named, seed=1, stream=True
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas if d.function] == [(0, "add")]
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function)) == json.loads(
        calls[0].function.arguments
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tool_results_go_back_and_auto_answers(client: OpenAI) -> None:
    """A conversation with the assistant's calls and the tools' results renders; with auto, a random model's
    reply (no call markup) is plain content."""
    model = client.models.list().data[0].id
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages: Any = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = client.chat.completions.create(model=model, messages=messages, tools=OPENAI_TOOLS, max_tokens=8, seed=2)
    choice = reply.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.message.tool_calls is None
    assert choice.message.content is not None
    streamed = client.chat.completions.create(
        model=model, messages=messages, tools=OPENAI_TOOLS, max_tokens=8, seed=2, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "multiply"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(client: OpenAI, arguments: dict[str, Any], param: str) -> None:
    model = client.models.list().data[0].id
    arguments = {"tools": OPENAI_TOOLS, **arguments}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, **arguments)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param, body


def _proto_tools() -> list[pb.Tool]:
    return [pb.Tool(name=t.name, description=t.description, parameters=json.dumps(dict(t.parameters))) for t in TOOLS]


def test_the_chat_rpc_calls_tools_as_the_openai_face_does(tool_server: ServerProcess) -> None:
    """modelserve.v1's Chat: tools, tool_choice, tool_choice_function; the calls on the last message, the held
    text never streamed; the calls sent back as an assistant message with the tool's result."""
    with tool_server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        user = pb.ChatMessage(role="user", content="What is 2 + 3?")
        for seed in range(5):
            request = pb.ChatRequest(
                messages=[user],
                tools=_proto_tools(),
                tool_choice=pb.TOOL_CHOICE_REQUIRED,
                parallel_tool_calls=False,
                params=pb.GenerationParameters(max_new_tokens=300, seed=seed),
            )
            messages = list(stub.Chat(request, timeout=60))
            last = messages[-1]
            assert last.finish_reason == pb.FINISH_REASON_EOS_TOKEN and len(last.tool_calls) == 1
            assert not "".join(m.text for m in messages)  # the reply was the call: no text streamed
            call = last.tool_calls[0]
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            assert all(not m.tool_calls for m in messages[:-1])
        named = pb.ChatRequest(
            messages=[user],
            tools=_proto_tools(),
            tool_choice_function="get_weather",
            params=pb.GenerationParameters(seed=3),
        )
        call = list(stub.Chat(named, timeout=60))[-1].tool_calls[0]
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER)

        back = pb.ChatRequest(
            messages=[
                user,
                pb.ChatMessage(role="assistant", tool_calls=[call]),
                pb.ChatMessage(role="tool", tool_call_id=call.id, content='{"forecast": "sun"}'),
            ],
            tools=_proto_tools(),
            params=pb.GenerationParameters(max_new_tokens=6, seed=4),
        )
        answer = list(stub.Chat(back, timeout=60))
        assert answer[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"tool_choice_function": "multiply"}, "tool_choice_function names the function 'multiply'"),
        ({"tools": [pb.Tool(name="f", parameters="{not json")]}, "tools[0].parameters is not valid JSON"),
        ({"tool_choice": pb.TOOL_CHOICE_REQUIRED, "tools": []}, "tool_choice is required, but tools is empty"),
        (
            {
                "tool_choice": pb.TOOL_CHOICE_REQUIRED,
                "params": pb.GenerationParameters(structured_output=pb.StructuredOutput(regex="a")),
            },
            "cannot be combined with params.structured_output",
        ),
    ],
)
def test_bad_tool_chats_are_invalid_argument(tool_server: ServerProcess, fields: dict[str, Any], named: str) -> None:
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="Hi")], **{"tools": _proto_tools(), **fields}
    )
    with tool_server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.GenerationServiceStub(channel).Chat(request, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert named in err.value.details()  # type: ignore[attr-defined]
