"""Chat: messages rendered by the model's chat template, then generated as Generate does.

Unit tests of render_chat (the demo's template, a template that writes BOS, errors that name the
message) and of where a template comes from (the tokenizer, --chat-template FILE); then a real
server over gRPC, the Python client, a reflection client that does what grpcurl does, and the
`modelserve-client chat` session driven through a pipe, Ctrl-C included.

The chat server's model has a word tokenizer whose post-processor adds BOS, as Llama's does, and a
template (from --chat-template) that starts with bos_token: the prompt must carry one BOS, not two.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import json_format
from modelserve_client import AsyncModelServeClient, ModelServeClient
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from tokenizers import Tokenizer, processors

from bench.harness import ROOT, wait_idle, wait_until
from modelserve.models.demo import DEMO_CHAT_TEMPLATE, DEMO_WORDS, demo_model_dir
from modelserve.models.loader import ModelInfo, _chat_template, load_model_info
from modelserve.models.random_init import EOS_TOKEN, UNK_TOKEN, build_random_model, build_word_tokenizer
from modelserve.server.core.chat import ChatError, ChatMessage, check_chat_size, render_chat, with_chat_template
from tests.conftest import LONG, LONG_CONTEXT, ServerProcess, long_args, start_server

TOKEN = "chat-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CALL_TIMEOUT_S = 120
MAX_PROMPT_BYTES = 4096
CLI = Path(sys.executable).parent / "modelserve-client"
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"  # pinned there (`npm ci`; make test runs it)

# Llama 2's kind of template: BOS first, a system message, then user and assistant in turn, or it refuses.
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}"
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}"
    "{% endif %}"
    "[{{ message['role'] }}] {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def word_tokenizer(adds_bos: bool) -> Tokenizer:
    """The demo's word tokenizer; with `adds_bos`, its post-processor adds BOS (its EOS token) as Llama's does."""
    tokenizer = build_word_tokenizer(DEMO_WORDS)
    if adds_bos:
        bos_id = tokenizer.token_to_id(EOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{EOS_TOKEN} $A", special_tokens=[(EOS_TOKEN, bos_id)]
        )
    return tokenizer


def model_info(template: str | None, adds_bos: bool = False) -> ModelInfo:
    tokenizer = word_tokenizer(adds_bos)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    return ModelInfo(
        tokenizer=tokenizer,
        model_id="chat-test",
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=tokenizer.get_vocab_size(),
        max_sequence_length=2048,
        eos_token_ids=(eos_id,),
        special_tokens=(("bos", EOS_TOKEN, eos_id), ("eos", EOS_TOKEN, eos_id)),
        device=torch.device("cpu"),
        dtype=torch.float32,
        source="unused",
        chat_template=template,
    )


def chat_error(model: ModelInfo, messages: list[ChatMessage]) -> ChatError:
    with pytest.raises(ChatError) as caught:
        render_chat(model, messages)
    return caught.value


# ---- render_chat ------------------------------------------------------------------------------------------------


def test_demo_template_lays_out_each_turn_and_the_reply_prompt_in_words_the_demo_knows() -> None:
    model = model_info(DEMO_CHAT_TEMPLATE)
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Tell me about the river")]
    text = render_chat(model, messages)
    assert text == f"system: Be brief.{EOS_TOKEN}user: Tell me about the river{EOS_TOKEN}assistant:"
    ids = model.encode(text, add_special_tokens=False)
    assert model.tokenizer.token_to_id(UNK_TOKEN) not in ids  # no newline or other character it cannot spell
    assert ids.count(model.eos_token_ids[0]) == 2  # each turn ends with EOS, the demo's end of a turn


def test_the_demo_model_ships_its_template(tmp_path: Path) -> None:
    info = load_model_info(str(demo_model_dir(tmp_path)), torch.device("cpu"), torch.float32)
    assert info.chat_template == DEMO_CHAT_TEMPLATE


def test_a_template_that_writes_bos_gives_one_bos() -> None:
    """The template writes BOS and the tokenizer would add another: a chat prompt is tokenized without the
    tokenizer's special tokens, so it starts with exactly one."""
    model = model_info(ALTERNATING_TEMPLATE, adds_bos=True)
    bos_id = model.eos_token_ids[0]
    text = render_chat(model, [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello")])
    assert text == f"{EOS_TOKEN}[system] Be brief. {EOS_TOKEN}[user] Hello {EOS_TOKEN}[assistant] "
    assert model.encode(text)[:2] == [bos_id, bos_id]  # what tokenizing with special tokens would do
    ids = model.encode(text, add_special_tokens=False)
    assert ids[0] == bos_id and ids[1] != bos_id


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages is empty: a chat needs at least one message"),
        (
            [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"), ChatMessage("robot", "beep")],
            "messages[2].role 'robot' is not one of system, user, assistant, tool",
        ),
        (
            [ChatMessage("system", "Be brief."), ChatMessage("user", "")],
            "messages[1].content is empty; only assistant and tool messages may be",
        ),
        (
            [
                ChatMessage("user", "Hi"),
                ChatMessage("assistant", "Hello"),
                ChatMessage("user", "a"),
                ChatMessage("user", "b"),
            ],
            "messages[3] (role 'user'): the model's chat template refuses it: roles must alternate "
            "user/assistant/user/...",
        ),
        (
            [ChatMessage("assistant", "I start")],
            "messages[0] (role 'assistant'): the model's chat template refuses it: roles must alternate "
            "user/assistant/user/...",
        ),
    ],
    ids=["empty", "unknown-role", "empty-content", "template-refuses-a-later-message", "template-refuses-the-first"],
)
def test_invalid_chats_name_the_message(messages: list[ChatMessage], message: str) -> None:
    error = chat_error(model_info(ALTERNATING_TEMPLATE), messages)
    assert (error.code, str(error)) == ("invalid", message)


def test_the_first_refused_message_of_a_long_chat() -> None:
    """The template's refusal is traced to the message that caused it, also deep in a long chat."""
    turns = [ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(300)]
    turns[201] = ChatMessage("user", "out of turn")
    assert str(chat_error(model_info(ALTERNATING_TEMPLATE), turns)).startswith("messages[201] (role 'user'):")


def test_empty_assistant_and_tool_messages_are_allowed() -> None:
    text = render_chat(
        model_info(DEMO_CHAT_TEMPLATE),
        [ChatMessage("user", "Hi"), ChatMessage("assistant", ""), ChatMessage("tool", ""), ChatMessage("user", "Hi")],
    )
    assert f"assistant: {EOS_TOKEN}tool: {EOS_TOKEN}" in text


def test_no_template_says_how_to_give_one() -> None:
    error = chat_error(model_info(None), [ChatMessage("user", "Hi")])
    assert error.code == "no_template"
    assert str(error) == "the model chat-test has no chat template; start the server with --chat-template FILE"


def test_size_bound_counts_roles_and_contents() -> None:
    check_chat_size([ChatMessage("user", "x" * 96)], 100)
    with pytest.raises(ChatError, match=r"^messages are 101 bytes \(roles and contents\); the limit is 100 bytes$"):
        check_chat_size([ChatMessage("user", "x" * 97)], 100)
    with pytest.raises(ChatError, match=r"^messages are 108 bytes"):  # many empty messages cost their roles
        check_chat_size([ChatMessage("assistant", "")] * 8 + [ChatMessage("user", "x" * 32)], 100)


# ---- where the template comes from ------------------------------------------------------------------------------


def test_a_dict_of_templates_gives_the_default_one() -> None:
    assert _chat_template(SimpleNamespace(chat_template={"tool_use": "T", "default": "D"})) == "D"
    assert _chat_template(SimpleNamespace(chat_template={"tool_use": "T"})) is None
    assert _chat_template(SimpleNamespace(chat_template=None)) is None
    assert _chat_template(SimpleNamespace(chat_template="S")) == "S"


def test_chat_template_file_replaces_the_models_own(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(ALTERNATING_TEMPLATE)
    assert with_chat_template(model_info(DEMO_CHAT_TEMPLATE), str(path)).chat_template == ALTERNATING_TEMPLATE
    assert with_chat_template(model_info(DEMO_CHAT_TEMPLATE), "").chat_template == DEMO_CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^--chat-template {path}: cannot read it: No such file or directory$"),
        ("  \n", r"^--chat-template {path}: the file is empty$"),
        ("{% for m in messages %}", r"^--chat-template {path}: not a valid Jinja template: line 1: .*'endfor'"),
    ],
    ids=["missing", "empty", "syntax"],
)
def test_a_bad_template_file_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "chat.jinja"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message.format(path=path)):
        with_chat_template(model_info(None), str(path))


def test_a_models_template_that_does_not_compile_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    assert with_chat_template(model_info("{% if %}"), "").chat_template is None
    assert "the model's chat template does not compile (line 1:" in caplog.text


# ---- a real server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat-template") / "chat.jinja"
    path.write_text(ALTERNATING_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, template_file: Path) -> Iterator[ServerProcess]:
    """A tiny Llama whose tokenizer adds BOS, with its own (demo) template replaced by --chat-template's;
    token auth on, so that Chat is seen to pass the auth interceptor."""
    model = build_random_model(
        tmp_path_factory.mktemp("chat-model"),
        "llama",
        seed=7,
        tokenizer=word_tokenizer(adds_bos=True),
        chat_template=DEMO_CHAT_TEMPLATE,
        max_len=LONG_CONTEXT,  # room for a reply that is still running however slow the machine is
    )
    server = start_server(
        tmp_path_factory.mktemp("chat-server"),
        *("--model", str(model), "--chat-template", str(template_file), "--auth-token", TOKEN),
        *("--max-prompt-bytes", str(MAX_PROMPT_BYTES), *long_args(1)),
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()
        assert server.log_errors() == []


class Authed:
    """A stub whose every call carries the bearer token."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return functools.partial(getattr(self._stub, name), metadata=AUTH)


@pytest.fixture()
def chat_stub(chat_server: ServerProcess) -> Iterator[Any]:
    with chat_server.channel() as channel:
        yield Authed(pb_grpc.GenerationServiceStub(channel))


def chat_request(*turns: tuple[str, str], **params: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role=role, content=content) for role, content in turns],
        params=pb.GenerationParameters(**params),
    )


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


GREEDY = dict(max_new_tokens=8, temperature=0.0, ignore_eos=True)
HELLO = (("system", "Be brief."), ("user", "Tell me about the river"))


def test_chat_streams_what_generate_streams_for_the_rendered_prompt(chat_stub: Any) -> None:
    """The prompt is the template's (BOS first, once), and from there the call is a Generate: the same
    message shapes, and greedy output equal to Generate's on the same tokens."""
    rendered = f"{EOS_TOKEN}[system] Be brief. {EOS_TOKEN}[user] Tell me about the river {EOS_TOKEN}[assistant] "
    n_prompt = chat_stub.Tokenize(pb.TokenizeRequest(text=rendered, add_special_tokens=False)).token_count
    messages = list(chat_stub.Chat(chat_request(*HELLO, **GREEDY), timeout=CALL_TIMEOUT_S))
    first, *middle, last = messages
    assert first.request_id and first.usage.input_tokens == n_prompt and not first.token_ids
    assert middle and all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in middle)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.output_tokens == 8
    # Generate adds BOS itself (this tokenizer's post-processor): given the rest, it sees the same tokens.
    request = pb.GenerateRequest(prompt=rendered.removeprefix(EOS_TOKEN), params=pb.GenerationParameters(**GREEDY))
    generated = list(chat_stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert generated[0].usage.input_tokens == n_prompt
    assert [t for m in messages for t in m.token_ids] == [t for m in generated for t in m.token_ids]
    assert "".join(m.text for m in messages) == "".join(m.text for m in generated)


OPERATIONS = ("chat", "text_completion")


def finished_count(server: ServerProcess, **labels: str) -> float:
    return server.metric("modelserve_requests_finished_total", **labels)


def test_a_chats_telemetry_names_the_chat_operation(chat_server: ServerProcess, chat_stub: Any) -> None:
    """GenAI semantic conventions: a chat's request is gen_ai.operation.name "chat", a prompt's
    "text_completion", when it ends and when it is refused (the metrics are recorded before the last
    message or the status is sent)."""

    def counts() -> list[float]:
        return [
            *(finished_count(chat_server, gen_ai_operation_name=op, finish_reason="length") for op in OPERATIONS),
            *(
                chat_server.metric(
                    "modelserve_requests_rejected_total", gen_ai_operation_name=op, error_type="invalid_argument"
                )
                for op in OPERATIONS
            ),
        ]

    before = counts()
    list(chat_stub.Chat(chat_request(*HELLO, **GREEDY), timeout=CALL_TIMEOUT_S))
    list(
        chat_stub.Generate(
            pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(**GREEDY)), timeout=CALL_TIMEOUT_S
        )
    )
    with pytest.raises(grpc.RpcError):
        list(chat_stub.Chat(chat_request(("robot", "beep")), timeout=CALL_TIMEOUT_S))
    with pytest.raises(grpc.RpcError):
        list(
            chat_stub.Generate(
                pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(top_p=2.0)), timeout=CALL_TIMEOUT_S
            )
        )
    assert counts() == [n + 1 for n in before]


@pytest.mark.parametrize(
    ("turns", "params", "details"),
    [
        (
            (("user", "Hi"), ("robot", "beep")),
            {},
            "messages[1].role 'robot' is not one of system, user, assistant, tool",
        ),
        ((), {}, "messages is empty: a chat needs at least one message"),
        (
            (("user", "Hi"), ("user", "Hi again")),
            {},
            "messages[1] (role 'user'): the model's chat template refuses it: roles must alternate "
            "user/assistant/user/...",
        ),
        ((("user", "x" * MAX_PROMPT_BYTES),), {}, f"messages are {MAX_PROMPT_BYTES + 4} bytes (roles and contents)"),
        ((("user", "Hi"),), {"temperature": -1.0}, "params.temperature must be in [0, 100] (0 = greedy), got -1"),
    ],
    ids=["unknown-role", "empty", "template-refuses", "too-large", "generate-validation"],
)
def test_invalid_chat_is_invalid_argument_naming_the_message(
    chat_stub: Any, turns: tuple[tuple[str, str], ...], params: dict[str, float], details: str
) -> None:
    error = rpc_error(lambda: list(chat_stub.Chat(chat_request(*turns, **params), timeout=CALL_TIMEOUT_S)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(details), error.details()


def test_chat_without_a_template_is_failed_precondition(stub: Any) -> None:
    error = rpc_error(lambda: list(stub.Chat(chat_request(("user", "Hi")), timeout=CALL_TIMEOUT_S)))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().endswith("has no chat template; start the server with --chat-template FILE")


def test_chat_passes_the_auth_and_parsing_interceptors(chat_server: ServerProcess) -> None:
    with chat_server.channel() as channel:
        chat = pb_grpc.GenerationServiceStub(channel).Chat
        error = rpc_error(lambda: list(chat(chat_request(("user", "Hi")), timeout=CALL_TIMEOUT_S)))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        raw = channel.unary_stream("/modelserve.v1.GenerationService/Chat")
        error = rpc_error(lambda: list(raw(b"\xff\xff", timeout=CALL_TIMEOUT_S, metadata=AUTH)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "the request to /modelserve.v1.GenerationService/Chat is not a valid message" in error.details()


def test_reflection_chat_as_grpcurl_does(chat_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """What `grpcurl -H 'authorization: Bearer …' -d '{"messages":[{"role":"user","content":"Hi"}]}'
    HOST:PORT modelserve.v1.GenerationService/Chat` does: the method and its messages from server
    reflection alone (no generated code), the request from JSON, the stream printed as JSON."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message_factory import GetMessageClass
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with chat_server.channel() as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("modelserve.v1.GenerationService").methods_by_name["Chat"]
        assert method.server_streaming and not method.client_streaming
        request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        request = json_format.Parse('{"messages":[{"role":"user","content":"Hi"}]}', request_class())
        call = channel.unary_stream(
            "/modelserve.v1.GenerationService/Chat",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        for response in call(request, timeout=CALL_TIMEOUT_S, metadata=AUTH):
            print(json_format.MessageToJson(response, indent=None))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) >= 3 and "finishReason" in lines[-1] and "finishReason" not in lines[0]
    assert any(line.get("text") for line in lines[1:])


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a stream that writes them one after another (as buf curl does, indented)."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        value, at = decoder.raw_decode(text, at)
        objects.append(value)
    return objects


@pytest.mark.skipif(not BUF.is_file(), reason="buf is not installed: run `npm ci` in clients/node (make test does)")
def test_buf_curl_streams_chat_from_json_through_reflection(chat_server: ServerProcess, chat_stub: Any) -> None:
    """`buf curl`, the buf CLI's grpcurl (grpcurl itself has no package here, and no offline build): the
    method from server reflection, the request from JSON, the stream printed as JSON; the same text as a
    Chat through the generated stubs."""
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "params": params})
    url = f"http://{chat_server.address}/modelserve.v1.GenerationService/Chat"
    auth = f"authorization: Bearer {TOKEN}"
    command = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-H", auth, "--data", body, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    first, *middle, last = _json_objects(done.stdout)
    assert first["requestId"] and "finishReason" not in first and middle
    assert last["finishReason"] == "FINISH_REASON_LENGTH" and last["usage"]["outputTokens"] == 8
    expected = chat_stub.Chat(chat_request(("user", "Hi"), **GREEDY), timeout=CALL_TIMEOUT_S)
    assert "".join(m.get("text", "") for m in (*middle, last)) == "".join(m.text for m in expected)


def test_client_chat_sync_and_async(chat_server: ServerProcess) -> None:
    import asyncio

    history = [{"role": role, "content": content} for role, content in HELLO]
    with ModelServeClient(chat_server.address, token=TOKEN, timeout_s=CALL_TIMEOUT_S) as client:
        deltas = list(client.chat(history, **GREEDY))
        last = list(client.stream_chat([pb.ChatMessage(role=r, content=c) for r, c in HELLO], GREEDY))[-1]
    assert len(deltas) > 1 and last.finish_reason == pb.FINISH_REASON_LENGTH

    async def async_chat() -> list[str]:
        async with AsyncModelServeClient(chat_server.address, token=TOKEN, timeout_s=CALL_TIMEOUT_S) as client:
            return [delta async for delta in client.chat(history, GREEDY)]

    assert "".join(asyncio.run(async_chat())) == "".join(deltas)  # a lagging reader's deltas may be merged
    with (
        ModelServeClient(chat_server.address) as client,
        pytest.raises(TypeError, match="a chat message is a ChatMessage or a mapping with 'role' and 'content'"),
    ):
        client.chat([{"role": "user"}])


# ---- the CLI's chat session -------------------------------------------------------------------------------------


def cli(address: str, *args: str) -> list[str]:
    return [str(CLI), "--address", address, "--token", TOKEN, "chat", *args]


def test_cli_chat_keeps_the_history_and_streams_each_reply(chat_server: ServerProcess) -> None:
    """Lines piped in are the user's turns; each reply is a line out, made with the whole conversation
    (the same replies the client gets for the same history); /exit ends the session."""
    args = ("--system", "Be brief.", "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos")
    done = subprocess.run(
        cli(chat_server.address, *args),
        input="Tell me about the river\n\nAnd the sea\n/exit\nnever sent\n",
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river"}]
    with ModelServeClient(chat_server.address, token=TOKEN, timeout_s=CALL_TIMEOUT_S) as client:
        first = "".join(client.chat(history, max_new_tokens=6, temperature=0, ignore_eos=True))
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the sea"}]
        second = "".join(client.chat(history, max_new_tokens=6, temperature=0, ignore_eos=True))
    assert first.strip() and done.stdout == f"{first}\n{second}\n"


def test_cli_chat_without_a_template_ends_with_the_reason(llama_server: ServerProcess) -> None:
    done = subprocess.run(
        [str(CLI), "--address", llama_server.address, "chat"],
        input="Hi\nHi again\n",
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("error: FAILED_PRECONDITION: the model") == 1, done.stderr


class _Pipe:
    """Everything a child writes to one pipe, read by a thread as it comes, so the child never blocks on a full
    pipe (a long reply fills 64 KiB; a CLI blocked writing it cannot report a Ctrl-C on its other pipe)."""

    def __init__(self, stream: Any) -> None:
        self.data = b""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream.fileno(),), daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            with self._changed:
                self.data += chunk
                self._changed.notify_all()

    def wait_for(self, done: Callable[[bytes], bool], timeout_s: float = CALL_TIMEOUT_S) -> bytes:
        """The data once `done` holds for it; fails after `timeout_s`."""
        with self._changed:
            assert self._changed.wait_for(lambda: done(self.data), timeout_s), f"timed out; so far {self.data!r}"
            return self.data


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """A child started in here takes Ctrl-C as from a terminal, even when this process inherited SIGINT ignored
    (as a background job of a shell without job control does: a script's `cmd &`, which a CI runner may use).
    A process that starts with SIGINT ignored keeps ignoring it, and Python then installs no KeyboardInterrupt;
    a handled signal is reset to the default in a child, so handling it here for the Popen is enough."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cancelled_count(server: ServerProcess) -> float:
    return finished_count(server, finish_reason="cancelled")


def test_cli_chat_ctrl_c_stops_the_reply_not_the_session(chat_server: ServerProcess, chat_stub: Any) -> None:
    """Ctrl-C mid-reply cancels its call (the server counts it cancelled and frees its row), says so,
    and the next line is answered (and stopped the same way); end of input then ends the session normally.
    Each reply may run LONG tokens, so it is still running when the signal comes, however loaded the
    machine is (with 1,500 a loaded CI run once finished the reply first, and the signal met the prompt)."""
    cancelled_before = cancelled_count(chat_server)
    with sigint_not_ignored():
        proc = subprocess.Popen(
            cli(chat_server.address, "--max-new-tokens", str(LONG), "--ignore-eos", "--temperature", "0"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        out, err = _Pipe(proc.stdout), _Pipe(proc.stderr)
        replies = []
        for n, line in enumerate((b"Tell me about the river\n", b"And the sea\n"), start=1):
            start = len(out.data)  # nothing more comes on stdout until this line's reply
            proc.stdin.write(line)
            proc.stdin.flush()
            out.wait_for(lambda data, start=start: bool(data[start:].strip()))  # the reply has begun
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda data, n=n: data.count(b"[stopped]") == n)
            # The CLI ends the stopped reply's line on stdout, then says [stopped]: wait for that line end, so
            # the next turn starts counting after all of this reply.
            replies.append(out.wait_for(lambda data: data.endswith(b"\n"))[start:])
            cancelled = wait_until(lambda: cancelled_count(chat_server), lambda c, n=n: c >= cancelled_before + n, 30)
            assert cancelled == cancelled_before + n
            assert wait_idle(chat_stub).requests_running == 0
        proc.stdin.close()  # end of input
        assert proc.wait(timeout=CALL_TIMEOUT_S) == 0
        assert all(reply.strip() for reply in replies)  # both lines were answered until stopped
    except AssertionError as exc:  # what the CLI said on stderr tells a refused turn from a hung one
        raise AssertionError(f"{exc}\nthe CLI's stderr so far: {err.data!r}") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
