"""The Node client (clients/node) against a live server: its CLI streams Generate and Chat as they are
generated, the same text as the Python client, with a bearer token; and its committed TypeScript stubs are
exactly what `make proto` makes from protos/ (scripts/generate_buf_stubs.py, buf.gen.yaml).

Needs `node` and `npm ci` run in clients/node (`make install` runs it where npm exists); without them the
tests skip and say which is missing."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
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

NODE = shutil.which("node")
NODE_DIR = ROOT / "clients" / "node"
CLI = NODE_DIR / "dist" / "cli.js"
GENERATED = NODE_DIR / "src" / "gen"
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="no node on PATH: install Node.js 20 or later"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules").is_dir() or not CLI.is_file(),
        reason="the Node client is not installed: run `npm ci` in clients/node (make install does where npm exists)",
    ),
]

TOKEN = "node-client-test-token"
# A plain chat template: the tiny test model has none of its own.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
GREEDY = ("--temperature", "0", "--ignore-eos")
# The line --log-level DEBUG writes for each request (telemetry/request_outcome.py).
CANCELLED_LOG = re.compile(r"request \S+: cancelled after [\d.]+s, \d+ prompt tokens, (\d+) output tokens")
CALL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny Llama model (long context, for a reply still running when Ctrl-C comes) with a chat template,
    behind a bearer token; a log line for each request."""
    root = tmp_path_factory.mktemp("node-client")
    template = root / "template.jinja"
    template.write_text(TEMPLATE)
    args = ("--model", str(long_model_dir), "--chat-template", str(template), "--log-level", "DEBUG", *long_args(2))
    proc = start_server(root, *args, env={"MODELSERVE_AUTH_TOKEN": TOKEN})
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.terminate()


def node_cli(*args: str) -> list[str]:
    assert NODE is not None
    return [NODE, str(CLI), *args]


def node_env() -> dict[str, str]:
    """The environment without a token, so that only --token gives one."""
    return {k: v for k, v in os.environ.items() if k != "MODELSERVE_AUTH_TOKEN"}


def run_node(server: ServerProcess, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    auth = ("--token", token) if token else ()
    return subprocess.run(
        node_cli("--target", server.address, *auth, *args),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        env=node_env(),
        check=False,
    )


def python_client(server: ServerProcess) -> ModelServeClient:
    return ModelServeClient(server.address, token=TOKEN, timeout_s=CALL_TIMEOUT_S)


def test_generate_streams_the_text_the_python_client_gets(server: ServerProcess) -> None:
    with python_client(server) as client:
        expected = "".join(client.generate("Hello there", max_new_tokens=12, temperature=0, ignore_eos=True))
    done = run_node(server, "generate", "Hello there", "--max-new-tokens", "12", *GREEDY, "-v")
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert "LENGTH | " in done.stderr and " in, 12 out | seed " in done.stderr, done.stderr


def test_chat_streams_the_reply_the_python_client_gets(server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea"}]
    with python_client(server) as client:
        expected = "".join(client.chat(messages, max_new_tokens=10, temperature=0, ignore_eos=True))
    args = ("--system", "Be brief.", "--max-new-tokens", "10", *GREEDY, "-v")
    done = run_node(server, "chat", "Tell me about the sea", *args)
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert " in, 10 out | " in done.stderr, done.stderr


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed under the read once the process has ended
        stream.read()


def test_text_streams_as_generated_and_ctrl_c_cancels_the_call(server: ServerProcess) -> None:
    """Streamed, not printed at the end: text arrives while a LONG-token reply is still running; Ctrl-C then
    exits 130 and cancels the call, so the server stops generating."""
    cmd = node_cli("--target", server.address, "--token", TOKEN, "generate", "Once", "--max-new-tokens", str(LONG))
    with subprocess.Popen([*cmd, *GREEDY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env()) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        assert first.strip() and proc.poll() is None, "the process had ended by the time its first text arrived"
        # Read the rest as it comes: Node writes to a pipe synchronously, and one blocked on a full pipe would
        # not take the signal.
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(CALL_TIMEOUT_S) == 130, proc.stderr.read()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while not (ended := CANCELLED_LOG.search(server.log())) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's own log, bounded
    assert ended, "the server logged no cancelled request"
    assert int(ended[1]) < LONG, ended[0]


def test_a_missing_or_wrong_token_fails_with_unauthenticated(server: ServerProcess) -> None:
    for token in (None, "wrong"):
        done = run_node(server, "generate", "Hello", "--max-new-tokens", "4", token=token)
        assert done.returncode == 1, (token, done.stdout, done.stderr)
        assert done.stderr.startswith("error: UNAUTHENTICATED: "), done.stderr
        assert "Error:" not in done.stderr and "    at " not in done.stderr  # one line, no stack trace


def test_bad_usage_exits_2_before_any_call() -> None:
    for args in (("generate",), ("summarize", "text"), ("generate", "Hello", "--temperature", "warm")):
        done = subprocess.run(node_cli(*args), capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: "), done.stderr


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_buf_stubs", ROOT / "scripts" / "generate_buf_stubs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_typescript_stubs_match_protos(tmp_path: Path) -> None:
    written, _ = _load_generator().generate(tmp_path)
    fresh_dir = tmp_path / GENERATED.relative_to(ROOT)
    fresh = {p.relative_to(fresh_dir): p.read_bytes() for p in written if p.is_relative_to(fresh_dir)}
    assert fresh, "the TypeScript plugin wrote nothing"
    committed = {p.relative_to(GENERATED): p.read_bytes() for p in GENERATED.rglob("*") if p.is_file()}
    assert sorted(committed) == sorted(fresh), "clients/node/src/gen is out of date with protos/: run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"clients/node/src/gen/{name} is out of date with protos/: run `make proto`"
