"""The Go client (clients/go) against a live server: its CLI, built from the committed stubs, streams what
the Python client gets for Generate and Chat, and Ctrl-C cancels the call; the committed stubs match protos/.

Needs Go and Debian's grpc-go and protobuf-go sources (`make test` installs them where it runs as root with
apt-get): the CLI is built offline against them in GOPATH mode (scripts/go_offline.py). Without them the
tests skip and say what is missing."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

import pytest
from modelserve_client import ModelServeClient

from bench.harness import ROOT, ServerProcess, start_server
from tests.conftest import LONG, long_args


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GO = _load_script("go_offline")
GENERATED = ROOT / "clients" / "go" / "gen"
pytestmark = pytest.mark.skipif(GO.missing() is not None, reason=str(GO.missing()))

TOKEN = "go-client-test-token"
TEMPLATE = (  # a plain chat template: the tiny test model has none of its own
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
GREEDY = ("-temperature", "0", "-ignore-eos")
# The line --log-level DEBUG writes for each request (telemetry/request_outcome.py).
CANCELLED_LOG = re.compile(r"request \S+: cancelled after [\d.]+s, \d+ prompt tokens, (\d+) output tokens")
CALL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go's CLI, built from the committed stubs."""
    work = tmp_path_factory.mktemp("go-build")
    binary = work / "modelserve-go"
    GO.build(f"{GO.MODULE_PATH}/cmd/modelserve-go", binary, work)
    return Path(binary)


@pytest.fixture(scope="module")
def server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny Llama (long context, for a reply still running when Ctrl-C comes) with a chat template,
    behind a bearer token; a log line for each request."""
    root = tmp_path_factory.mktemp("go-client")
    template = root / "template.jinja"
    template.write_text(TEMPLATE)
    args = ("--model", str(long_model_dir), "--chat-template", str(template), "--log-level", "DEBUG", *long_args(2))
    proc = start_server(root, *args, env={"MODELSERVE_AUTH_TOKEN": TOKEN})
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.terminate()


def _env() -> dict[str, str]:
    """The environment without a token, so that only -token gives one."""
    return {k: v for k, v in os.environ.items() if k != "MODELSERVE_AUTH_TOKEN"}


def run_go(cli: Path, server: ServerProcess, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    auth = ("-token", token) if token else ()
    return subprocess.run(
        [str(cli), "-target", server.address, *auth, *args],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        env=_env(),
        check=False,
    )


def python_client(server: ServerProcess) -> ModelServeClient:
    return ModelServeClient(server.address, token=TOKEN, timeout_s=CALL_TIMEOUT_S)


def test_generate_streams_the_text_the_python_client_gets(cli: Path, server: ServerProcess) -> None:
    with python_client(server) as client:
        expected = "".join(client.generate("Hello there", max_new_tokens=12, temperature=0, ignore_eos=True))
    done = run_go(cli, server, "generate", "Hello there", "-max-new-tokens", "12", *GREEDY, "-v")
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert done.stderr.startswith("LENGTH | ") and " in, 12 out | seed " in done.stderr, done.stderr


def test_chat_streams_the_reply_the_python_client_gets(cli: Path, server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea"}]
    with python_client(server) as client:
        expected = "".join(client.chat(messages, max_new_tokens=10, temperature=0, ignore_eos=True))
    # Flags after the command and its text, as the other clients take them.
    args = ("-system", "Be brief.", "-max-new-tokens", "10", *GREEDY)
    done = run_go(cli, server, "chat", "Tell me about the sea", *args)
    assert done.returncode == 0, done.stderr
    assert expected.strip() and done.stdout == expected + "\n"


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed under the read once the process has ended
        stream.read()


def test_text_streams_as_generated_and_ctrl_c_cancels_the_call(cli: Path, server: ServerProcess) -> None:
    """Streamed, not printed at the end: text arrives while a LONG-token reply is still running; Ctrl-C then
    exits 130 and cancels the call, so the server stops generating."""
    cmd = [str(cli), "-target", server.address, "-token", TOKEN, "generate", "Once", "-max-new-tokens", str(LONG)]
    with subprocess.Popen([*cmd, *GREEDY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        assert first.strip() and proc.poll() is None, "the process had ended by the time its first text arrived"
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()  # a full pipe blocks a writer
        proc.send_signal(signal.SIGINT)
        assert proc.wait(CALL_TIMEOUT_S) == 130, proc.stderr.read()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while not (ended := CANCELLED_LOG.search(server.log())) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's own log, bounded
    assert ended, "the server logged no cancelled request"
    assert int(ended[1]) < LONG, ended[0]


def test_a_missing_or_wrong_token_fails_with_unauthenticated(cli: Path, server: ServerProcess) -> None:
    for token in (None, "wrong"):
        done = run_go(cli, server, "generate", "Hello", "-max-new-tokens", "4", token=token)
        assert done.returncode == 1, (token, done.stdout, done.stderr)
        assert done.stderr.startswith("error: UNAUTHENTICATED: ") and done.stderr.count("\n") == 1, done.stderr


def test_bad_usage_exits_2_before_any_call(cli: Path) -> None:
    for args in (("generate",), ("summarize", "text"), ("generate", "Hello", "-temperature", "warm")):
        done = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: "), done.stderr


def _plugin_version(code: bytes) -> bytes:
    """The `protoc-gen-go vX` line protoc-gen-go writes at the top of what it generates."""
    found = re.search(rb"^//\s+protoc-gen-go v\S+$", code, re.MULTILINE)
    return found[0] if found else b""


def test_committed_go_stubs_match_protos(tmp_path: Path) -> None:
    buf_stubs = _load_script("generate_buf_stubs")
    if not buf_stubs.BUF.is_file():
        pytest.skip("buf is not installed: run `npm ci` in clients/node (make test does where npm exists)")
    written, skipped = buf_stubs.generate(tmp_path)
    if any("protoc-gen-go" in plugin for plugin in skipped):
        pytest.skip(f"not installed: {skipped} (`make test` puts them in .venv/bin; see buf.gen.yaml)")
    fresh_dir = tmp_path / GENERATED.relative_to(ROOT)
    fresh = {p.relative_to(fresh_dir): p.read_bytes() for p in written if p.is_relative_to(fresh_dir)}
    assert fresh, "the Go plugins wrote nothing"
    messages = Path("modelserve/v1/generation.pb.go")
    ours, theirs = _plugin_version((GENERATED / messages).read_bytes()), _plugin_version(fresh[messages])
    if ours != theirs:  # another release's Debian packages another protobuf-go: equivalent code, other bytes
        pytest.skip(f"this machine's protoc-gen-go ({theirs.decode()}) is not the committed stubs' ({ours.decode()})")
    committed = {p.relative_to(GENERATED): p.read_bytes() for p in GENERATED.rglob("*") if p.is_file()}
    assert sorted(committed) == sorted(fresh), "clients/go/gen is out of date with protos/: run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"clients/go/gen/{name} is out of date with protos/: run `make proto`"
