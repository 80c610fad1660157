"""What a newcomer tripped over, each kept fixed: a wrong --model, a bad MODELSERVE_* value,
a silent first start, the demo's unreadable text, `make help`, and README probes that
disagreed with the Kubernetes manifest."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML: installed with huggingface_hub, which transformers needs
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from modelserve.cli import parse_args
from modelserve.models.demo import DEMO_VERSION, demo_model_dir
from modelserve.models.random_init import UNK_TOKEN, build_word_tokenizer
from modelserve.models.source import ModelLoadError, resolve_source
from tests.conftest import START_TIMEOUT_S, ServerProcess, start_server

ROOT = Path(__file__).resolve().parent.parent
REPLACEMENT = "\ufffd"

# --- 1. a wrong --model: one plain ERROR line, a non-zero exit, no traceback -----------------


def _bad_model_dirs(root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """case -> (--model value, what the ERROR line must say)."""
    empty = root / "empty"
    empty.mkdir()
    no_type = root / "no-model-type"
    no_type.mkdir()
    (no_type / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    missing = root / "models" / "Qwen2.5-0.5B-Instruct"
    return {
        "missing": (str(missing), (f"could not load the model: model directory {missing} does not exist",)),
        "empty": (str(empty), (f"could not load the model: model directory {empty} has no config.json",)),
        "no_model_type": (
            str(no_type),
            (f"could not load the model: {no_type / 'config.json'} has no model_type key",),
        ),
        "hub_id": (
            "modelserve-tests/no-such-model",
            (
                "could not load the model: 'modelserve-tests/no-such-model' is not a local directory (",
                "/modelserve-tests/no-such-model does not exist) and could not be fetched from the hub: ",
            ),
        ),
    }


@pytest.fixture(scope="module")
def bad_model_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ServerProcess, tuple[str, ...], int]]:
    """Each bad --model served by a real server process, all started at once; case -> (server, expected, exit)."""
    root = tmp_path_factory.mktemp("bad-models")
    # Offline with an empty hub cache: the hub case fails at once, the same on every machine.
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    servers = {
        case: (start_server(root, "--model", value, env=env), expected)
        for case, (value, expected) in _bad_model_dirs(root).items()
    }
    runs: dict[str, tuple[ServerProcess, tuple[str, ...], int]] = {}
    try:
        for case, (server, expected) in servers.items():
            runs[case] = (server, expected, server.proc.wait(START_TIMEOUT_S))
    finally:
        for server, _ in servers.values():
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
    return runs


@pytest.mark.parametrize("case", ["missing", "empty", "no_model_type", "hub_id"])
def test_bad_model_exits_with_one_plain_error_line(
    bad_model_runs: dict[str, tuple[ServerProcess, tuple[str, ...], int]], case: str
) -> None:
    server, expected, code = bad_model_runs[case]
    log = server.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert code != 0, log
    assert "Traceback" not in log, log
    assert len(errors) == 1, log
    assert all(fragment in errors[0] for fragment in expected), errors[0]


def test_loader_checks_a_local_directory_before_transformers(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=re.escape(f"model directory {tmp_path} has no config.json")):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*config\.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_source(str(tmp_path)) == (str(tmp_path), True)
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        resolve_source(str(tmp_path / "config.json"))
    with pytest.raises(ModelLoadError, match="--model is empty"):
        resolve_source("")
    assert resolve_source("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", False)  # tried on the hub
    assert resolve_source("gpt2") == ("gpt2", False)


# --- 2. MODELSERVE_* values are checked like flags: exit 2, the variable named ----------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MODELSERVE_PORT", "abc", "MODELSERVE_PORT='abc' is not an integer"),
        ("MODELSERVE_REFLECTION", "maybe", "MODELSERVE_REFLECTION='maybe': use one of 1/0, true/false, yes/no, on/off"),
        ("MODELSERVE_GRACE_S", "soon", "MODELSERVE_GRACE_S='soon' is not a number"),
        (
            "MODELSERVE_LOG_LEVEL",
            "loud",
            "--log-level / MODELSERVE_LOG_LEVEL 'loud': use one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            "MODELSERVE_LONG_PREFILL_CHUNK_TOKENS",
            "-1",
            "--long-prefill-chunk-tokens / MODELSERVE_LONG_PREFILL_CHUNK_TOKENS -1: use 0 (auto) or more",
        ),
    ],
)
def test_bad_environment_value_exits_2_naming_it(name: str, value: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "modelserve", "serve"],
        env={**os.environ, name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == f"modelserve serve: error: {message}", done.stderr


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("on", True), ("Yes", True), ("0", False), ("false", False), (" OFF ", False)]
)
def test_boolean_environment_values(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("MODELSERVE_REFLECTION", value)
    assert parse_args(["serve"]).reflection is expected


def test_flag_wins_over_a_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSERVE_PORT", "abc")
    assert parse_args(["serve", "--port", "6000"]).port == 6000
    monkeypatch.setenv("MODELSERVE_PORT", " 7000 ")
    assert parse_args(["serve"]).port == 7000


# --- 3 and 4. the demo model: says it is building, and its text reads as words ---------------


def test_demo_build_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="modelserve.models.demo"):
        first = demo_model_dir(tmp_path)
        second = demo_model_dir(tmp_path)
    assert first == second == tmp_path / f"demo-v{DEMO_VERSION}"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("building the demo model into" in m for m in messages) == 1, messages
    assert sum(m.startswith("built the demo model in") for m in messages) == 1, messages
    assert f"demo model: reusing {first}" in messages, messages


def test_word_tokenizer_encodes_anything_and_decodes_whole_words() -> None:
    tok = build_word_tokenizer(["hello", "world", "the", "cat"])
    unk = tok.token_to_id(UNK_TOKEN)
    assert isinstance(unk, int)
    text = "Hello, world! The cat sat on 42 mats."
    assert tok.decode(tok.encode(text).ids) == text  # ASCII is spelled out where no word fits
    assert tok.encode(" world").tokens == ["\u2581world"]
    odd = tok.encode("café 日本 🙂")
    assert odd.ids.count(unk) == 3  # é, 日本, 🙂: unknown, never bytes
    # No piece is a part of a character, so no sequence of them decodes to U+FFFD.
    assert REPLACEMENT not in tok.decode(list(range(tok.get_vocab_size())))


def _looks_like_words(text: str) -> float:
    """The share of space-separated chunks that are purely alphabetic."""
    chunks = text.split()
    return sum(chunk.isascii() and chunk.isalpha() for chunk in chunks) / max(1, len(chunks))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("newcomer-demo")
    server = start_server(tmp, "--cache-dir", str(tmp / "fresh-cache"), "--grace-s", "3")
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


def test_demo_first_start_logs_the_build(demo_server: ServerProcess) -> None:
    log = demo_server.log()
    cache = demo_server.log_path.parent / "fresh-cache" / f"demo-v{DEMO_VERSION}"
    assert f"building the demo model into {cache} (once" in log, log
    assert re.search(r"built the demo model in \d+\.\ds", log), log
    assert log.index("building the demo model") < log.index("built the demo model") < log.index("ready: serving")


@pytest.mark.parametrize(
    "params",
    [
        pb.GenerationParameters(max_new_tokens=48, temperature=0.0, ignore_eos=True),
        pb.GenerationParameters(max_new_tokens=48, temperature=1.0, seed=3, ignore_eos=True),
        pb.GenerationParameters(max_new_tokens=48, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "sampled", "top-p"],
)
def test_demo_text_is_random_words(demo_server: ServerProcess, params: pb.GenerationParameters) -> None:
    with demo_server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        responses = list(stub.Generate(pb.GenerateRequest(prompt="Hello, world", params=params), timeout=120))
    text = "".join(r.text for r in responses)
    assert responses[-1].usage.output_tokens == 48
    assert REPLACEMENT not in text, text
    assert len(text.split()) >= 24, text
    assert _looks_like_words(text) >= 0.75, text


def test_demo_tokenize_takes_any_prompt(demo_server: ServerProcess) -> None:
    with demo_server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
        unk = {t.role: t.token_id for t in info.special_tokens}["unk"]
        plain = stub.Tokenize(pb.TokenizeRequest(text="the cat sat", return_tokens=True), timeout=30)
        odd = stub.Tokenize(pb.TokenizeRequest(text="naïve 🙂 日本語", return_tokens=True), timeout=30)
    assert info.is_demo
    assert plain.token_count == 3 and list(plain.tokens) == ["the", "cat", "sat"]
    assert odd.token_count > 0 and unk in odd.token_ids


# --- 5. make help --------------------------------------------------------------------------


def _make(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout


def test_make_help_lists_every_target_and_is_the_default() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert phony is not None
    help_text = _make("help")
    for target in phony.group(1).split():
        assert re.search(rf"^  {re.escape(target)} +\S", help_text, re.MULTILINE), (target, help_text)
    assert _make() == help_text


def test_make_install_shows_pip_progress() -> None:
    commands = _make("-n", "-B", "install")  # dry run: prints the recipe, runs nothing
    pip_lines = [line for line in commands.splitlines() if "pip install" in line]
    assert len(pip_lines) == 4 and not any("--quiet" in line or " -q" in line for line in pip_lines), commands
    torch_line = '.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install torch==2.13.0'
    assert torch_line in commands.splitlines(), commands


# --- 6. the README's probes are the manifest's ---------------------------------------------

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _manifest_probes() -> dict[str, object]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / "modelserve.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {name: container[name] for name in PROBES}


def _readme_probes() -> dict[str, object]:
    readme = (ROOT / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)]
    found = [b for b in blocks if isinstance(b, dict) and set(PROBES) <= set(b)]
    assert len(found) == 1, "the README should have one yaml block with the three probes"
    return {name: found[0][name] for name in PROBES}


def test_readme_probes_match_the_kubernetes_manifest() -> None:
    assert _readme_probes() == _manifest_probes()
