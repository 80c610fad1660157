"""The Node client (clients/node) against a live server: its CLI streams Generate and Chat as they are
generated, the same text as the Python client, with a bearer token; and its committed TypeScript stubs are
exactly what `make proto` makes from protos/ (scripts/generate_buf_stubs.py, buf.gen.yaml).

Needs `node` and `npm ci` run in clients/node (`make install` runs it where npm exists); without them the
tests skip and say which is missing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import ROOT, ServerProcess
from tests.cli_clients import (
    CALL_TIMEOUT_S,
    assert_committed_stubs_match,
    assert_ctrl_c_cancels,
    client_server,
    load_script,
    python_chat,
    python_generate,
    run_cli,
)
from tests.conftest import LONG

NODE = shutil.which("node")
NODE_DIR = ROOT / "clients" / "node"
CLI = NODE_DIR / "dist" / "cli.js"
GENERATED = NODE_DIR / "src" / "gen"
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="no node on PATH: install Node.js 20 or later"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules").is_dir(),
        reason="the Node client is not installed: run `npm ci` in clients/node (make install does where npm exists)",
    ),
]

TOKEN = "node-client-test-token"
GREEDY = ("--temperature", "0", "--ignore-eos")


def test_the_client_compiles() -> None:
    """Its sources type-check against the generated code as it is now (npm ci's build failing would otherwise
    leave no dist/ and only make the tests below skip)."""
    tsc = NODE_DIR / "node_modules" / ".bin" / "tsc"
    done = subprocess.run([str(tsc), "-p", ".", "--noEmit"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert CLI.is_file(), "npm ci built dist/"


@pytest.fixture(scope="module")
def server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with client_server(long_model_dir, tmp_path_factory.mktemp("node-client"), TOKEN) as server:
        yield server


def node_cli(*args: str) -> list[str]:
    assert NODE is not None
    return [NODE, str(CLI), *args]


def run_node(server: ServerProcess, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    auth = ("--token", token) if token else ()
    return run_cli(node_cli("--target", server.address, *auth, *args))


def test_generate_streams_the_text_the_python_client_gets(server: ServerProcess) -> None:
    expected = python_generate(server, TOKEN)
    done = run_node(server, "generate", "Hello there", "--max-new-tokens", "12", *GREEDY, "-v")
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert "LENGTH | " in done.stderr and " in, 12 out | seed " in done.stderr, done.stderr


def test_chat_streams_the_reply_the_python_client_gets(server: ServerProcess) -> None:
    expected = python_chat(server, TOKEN)
    args = ("--system", "Be brief.", "--max-new-tokens", "10", *GREEDY, "-v")
    done = run_node(server, "chat", "Tell me about the sea", *args)
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert " in, 10 out | " in done.stderr, done.stderr


def test_text_streams_as_generated_and_ctrl_c_cancels_the_call(server: ServerProcess) -> None:
    cmd = node_cli("--target", server.address, "--token", TOKEN, "generate", "Once", "--max-new-tokens", str(LONG))
    assert_ctrl_c_cancels([*cmd, *GREEDY], server)


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


def test_committed_typescript_stubs_match_protos(tmp_path: Path) -> None:
    written, _ = load_script("generate_buf_stubs").generate(tmp_path)
    assert_committed_stubs_match(GENERATED, written, tmp_path)
