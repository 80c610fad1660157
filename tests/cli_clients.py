"""What the tests of the other languages' clients (tests/test_node_client.py, tests/test_go_client.py) share:
the server they call, the Ctrl-C check of a CLI, the check that committed stubs are what buf.gen.yaml makes,
and loading a script of scripts/."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

from modelserve_client import ModelServeClient

from bench.harness import ROOT, ServerProcess, start_server, wait_until
from tests.conftest import LONG, long_args

# A plain chat template: the tiny test model has none of its own.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The line --log-level DEBUG writes for each request (telemetry/request_outcome.py).
CANCELLED_LOG = re.compile(r"request \S+: cancelled after [\d.]+s, \d+ prompt tokens, (\d+) output tokens")
CALL_TIMEOUT_S = 120


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def client_server(long_model_dir: Path, root: Path, token: str) -> Iterator[ServerProcess]:
    """The tiny Llama (long context, for a reply still running when Ctrl-C comes) with a chat template, behind
    `token`; a log line for each request."""
    template = root / "template.jinja"
    template.write_text(TEMPLATE)
    args = ("--model", str(long_model_dir), "--chat-template", str(template), "--log-level", "DEBUG", *long_args(2))
    server = start_server(root, *args, env={"MODELSERVE_AUTH_TOKEN": token})
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


def env_without_token() -> dict[str, str]:
    """The environment without a token, so that only the CLI's flag gives one."""
    return {k: v for k, v in os.environ.items() if k != "MODELSERVE_AUTH_TOKEN"}


def run_cli(command: list[str]) -> subprocess.CompletedProcess[str]:
    """`command` run to its end, its output as text; the token only from its own flags."""
    return subprocess.run(
        command, capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env_without_token(), check=False
    )


def python_generate(server: ServerProcess, token: str) -> str:
    """What the Python client streams for the CLIs' Generate: 12 greedy tokens after "Hello there"."""
    with ModelServeClient(server.address, token=token, timeout_s=CALL_TIMEOUT_S) as client:
        text = "".join(client.generate("Hello there", max_new_tokens=12, temperature=0, ignore_eos=True))
    assert text.strip()
    return text


def python_chat(server: ServerProcess, token: str) -> str:
    """What the Python client streams for the CLIs' Chat: 10 greedy tokens of a reply to "Tell me about the
    sea" after the system message "Be brief."."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea"}]
    with ModelServeClient(server.address, token=token, timeout_s=CALL_TIMEOUT_S) as client:
        text = "".join(client.chat(messages, max_new_tokens=10, temperature=0, ignore_eos=True))
    assert text.strip()
    return text


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed under the read once the process has ended
        stream.read()


def assert_ctrl_c_cancels(command: list[str], server: ServerProcess) -> None:
    """`command` streams a LONG-token reply: text arrives while it is still running (streamed, not printed at
    the end); Ctrl-C then exits 130 and cancels the call, so the server logs it cancelled, short of LONG."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_without_token()) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        assert first.strip() and proc.poll() is None, "the process had ended by the time its first text arrived"
        # Read the rest as it comes: a CLI may write to a pipe synchronously (Node does), and one blocked on a
        # full pipe would not take the signal.
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(CALL_TIMEOUT_S) == 130, proc.stderr.read()
    ended = wait_until(lambda: CANCELLED_LOG.search(server.log()), bool, CALL_TIMEOUT_S)
    assert ended, "the server logged no cancelled request"
    assert int(ended[1]) < LONG, ended[0]


def assert_committed_stubs_match(generated: Path, written: list[Path], out_root: Path) -> None:
    """The committed stubs under `generated` are byte for byte what buf.gen.yaml wrote under `out_root`."""
    fresh_dir = out_root / generated.relative_to(ROOT)
    fresh = {p.relative_to(fresh_dir): p.read_bytes() for p in written if p.is_relative_to(fresh_dir)}
    assert fresh, f"the plugins for {generated.relative_to(ROOT)} wrote nothing"
    committed = {p.relative_to(generated): p.read_bytes() for p in generated.rglob("*") if p.is_file()}
    where = generated.relative_to(ROOT)
    assert sorted(committed) == sorted(fresh), f"{where} is out of date with protos/: run `make proto`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{where}/{name} is out of date with protos/: run `make proto`"
