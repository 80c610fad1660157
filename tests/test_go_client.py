"""The Go client (clients/go) against a live server: its CLI, built from the committed stubs, streams what
the Python client gets for Generate and Chat, and Ctrl-C cancels the call; the committed stubs match protos/.

Needs Go and Debian's grpc-go and protobuf-go sources (`make test` installs them where it runs as root with
apt-get): the CLI is built offline against them in GOPATH mode (scripts/go_offline.py). Without them the
tests skip and say what is missing."""

from __future__ import annotations

import re
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

GO = load_script("go_offline")
GENERATED = ROOT / "clients" / "go" / "gen"
GO_MISSING = GO.missing()
pytestmark = pytest.mark.skipif(GO_MISSING is not None, reason=str(GO_MISSING))

TOKEN = "go-client-test-token"
GREEDY = ("-temperature", "0", "-ignore-eos")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go's CLI, built from the committed stubs."""
    work = tmp_path_factory.mktemp("go-build")
    binary = work / "modelserve-go"
    GO.build(f"{GO.MODULE_PATH}/cmd/modelserve-go", binary, work)
    return Path(binary)


@pytest.fixture(scope="module")
def server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with client_server(long_model_dir, tmp_path_factory.mktemp("go-client"), TOKEN) as server:
        yield server


def run_go(cli: Path, server: ServerProcess, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    auth = ("-token", token) if token else ()
    return run_cli([str(cli), "-target", server.address, *auth, *args])


def test_generate_streams_the_text_the_python_client_gets(cli: Path, server: ServerProcess) -> None:
    expected = python_generate(server, TOKEN)
    done = run_go(cli, server, "generate", "Hello there", "-max-new-tokens", "12", *GREEDY, "-v")
    assert done.returncode == 0, done.stderr
    assert expected.strip()
    assert done.stdout == expected + "\n"
    assert done.stderr.startswith("LENGTH | ") and " in, 12 out | seed " in done.stderr, done.stderr


def test_chat_streams_the_reply_the_python_client_gets(cli: Path, server: ServerProcess) -> None:
    expected = python_chat(server, TOKEN)
    # Flags after the command and its text, as the other clients take them.
    args = ("-system", "Be brief.", "-max-new-tokens", "10", *GREEDY)
    done = run_go(cli, server, "chat", "Tell me about the sea", *args)
    assert done.returncode == 0, done.stderr
    assert expected.strip() and done.stdout == expected + "\n"


def test_text_streams_as_generated_and_ctrl_c_cancels_the_call(cli: Path, server: ServerProcess) -> None:
    cmd = [str(cli), "-target", server.address, "-token", TOKEN, "generate", "Once", "-max-new-tokens", str(LONG)]
    assert_ctrl_c_cancels([*cmd, *GREEDY], server)


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
    buf_stubs = load_script("generate_buf_stubs")
    if not buf_stubs.BUF.is_file():
        pytest.skip("buf is not installed: run `npm ci` in clients/node (make test does where npm exists)")
    written, skipped = buf_stubs.generate(tmp_path)
    if any("protoc-gen-go" in plugin for plugin in skipped):
        pytest.skip(f"not installed: {skipped} (`make test` puts them in .venv/bin; see buf.gen.yaml)")
    messages = GENERATED / "modelserve" / "v1" / "generation.pb.go"
    fresh = (tmp_path / messages.relative_to(ROOT)).read_bytes()
    ours, theirs = _plugin_version(messages.read_bytes()), _plugin_version(fresh)
    if ours != theirs:  # another release's Debian packages another protobuf-go: equivalent code, other bytes
        pytest.skip(f"this machine's protoc-gen-go ({theirs.decode()}) is not the committed stubs' ({ours.decode()})")
    assert_committed_stubs_match(GENERATED, written, tmp_path)
