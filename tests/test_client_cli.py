"""The `modelserve-client` CLI end to end against the tiny Llama server (run as a subprocess, as a shell
would), and the Python clients' keyword handling (stop as one sequence, unknown keywords)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import pytest
from modelserve_client import AsyncModelServeClient, ModelServeClient, generation_parameters
from modelserve_client import cli as client_cli
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from bench.harness import wait_idle
from tests.conftest import LONG, ServerProcess

CLI = Path(sys.executable).parent / "modelserve-client"
NOWHERE = "127.0.0.1:1"  # for runs that must fail before any call
CALL_TIMEOUT_S = 120


def run_cli(*args: str, address: str = NOWHERE, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "--address", address, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )


def assert_quiet_failure(done: subprocess.CompletedProcess[str], code: int) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr


GREEDY = ("--temperature", "0", "--ignore-eos")


def test_address_takes_a_list_of_replicas_or_a_dns_target(llama_server: ServerProcess) -> None:
    """Both forms reach the server (one replica behind each, here); a list of host names, which gRPC has no
    target for, is refused before any call, saying what to give instead."""
    for address in (f"{llama_server.address},{llama_server.address}", f"dns:///{llama_server.address}"):
        done = run_cli("generate", "Hello", "--max-new-tokens", "3", *GREEDY, address=address)
        assert done.returncode == 0 and done.stdout.strip(), (address, done.stderr)
    refused = run_cli("generate", "Hello", address="a.example:50051,b.example:50051")
    assert_quiet_failure(refused, 1)
    assert "dns:///NAME:PORT" in refused.stderr, refused.stderr


# ---- 1. where the prompt comes from -------------------------------------------------------------------------------


def test_prompt_dash_reads_stdin_exactly(llama_server: ServerProcess) -> None:
    args = ("--max-new-tokens", "6", *GREEDY, "-v")
    from_arg = run_cli("generate", "Hello there", *args, address=llama_server.address)
    from_stdin = run_cli("generate", "-", *args, address=llama_server.address, stdin="Hello there")
    assert from_arg.returncode == 0 and from_stdin.returncode == 0, (from_arg.stderr, from_stdin.stderr)
    assert from_stdin.stdout == from_arg.stdout and from_stdin.stdout.strip()
    tokens_in = re.search(r"\| (\d+) in, 6 out \|", from_arg.stderr)
    assert tokens_in, from_arg.stderr
    assert f"| {tokens_in.group(1)} in, 6 out |" in from_stdin.stderr


def test_prompt_file_too_long_for_a_command_line(llama_server: ServerProcess, tmp_path: Path) -> None:
    # Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN); this prompt is 200 KiB.
    words = ("alpha", "beta", "gamma", "delta", "ünïcode")
    prompt = " ".join(words[i % len(words)] + str(i % 97) for i in range(30_000))[: 200 * 1024]
    assert len(prompt.encode()) > 128 * 1024
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    with ModelServeClient(llama_server.address, timeout_s=CALL_TIMEOUT_S) as client:
        n_tokens = client.tokenize(prompt).token_count

    # The whole file is sent: the server counts every one of its tokens when it refuses it...
    refused = run_cli("generate", "--prompt-file", str(path), "--max-new-tokens", "4", address=llama_server.address)
    assert_quiet_failure(refused, 1)
    assert f"error: INVALID_ARGUMENT: prompt is {n_tokens} tokens" in refused.stderr, refused.stderr
    # ...and keeps only the last 8 with --truncate-input-tokens.
    done = run_cli(
        "generate",
        "--prompt-file",
        str(path),
        "--truncate-input-tokens",
        "8",
        "--max-new-tokens",
        "4",
        *GREEDY,
        "-v",
        address=llama_server.address,
    )
    assert done.returncode == 0, done.stderr
    assert "FINISH_REASON_LENGTH | 8 in, 4 out |" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "Hi", "--prompt-file", "x.txt"), "give PROMPT or --prompt-file, not both"),
        (("generate",), "give PROMPT, - (read stdin) or --prompt-file PATH"),
        (("generate", "--prompt-file", "/no/such/prompt.txt"), "cannot read --prompt-file /no/such/prompt.txt"),
    ],
)
def test_prompt_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    done = run_cli(*args)
    assert_quiet_failure(done, 2)
    assert message in done.stderr and "usage: modelserve-client generate" in done.stderr, done.stderr


def test_prompt_file_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    done = run_cli("generate", "--prompt-file", str(path))
    assert_quiet_failure(done, 2)
    assert "is not UTF-8 text" in done.stderr


# ---- 2. --logprobs, --version -------------------------------------------------------------------------------------

TOKEN = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
LOGPROB = r"(-?\d+\.\d{4})"


def test_logprobs_table_on_stderr(llama_server: ServerProcess) -> None:
    done = run_cli(
        "generate", "Hello", "--max-new-tokens", "5", *GREEDY, "--logprobs", "2", address=llama_server.address
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "stdout holds the text"
    header, *rows = done.stderr.splitlines()
    assert header.startswith("logprobs (natural log)")
    assert len(rows) == 5, done.stderr
    for i, row in enumerate(rows):
        chosen, _, alternatives = row.partition("  | ")
        match = re.fullmatch(rf"{i}\s+{TOKEN}\s+{LOGPROB}", chosen)
        assert match, row
        top = re.findall(rf"{TOKEN} {LOGPROB}", alternatives)
        assert len(top) == 2, row
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert top[0] == (match.group(1), match.group(2)), row
        assert float(top[0][1]) >= float(top[1][1]), row


def test_logprobs_zero_prints_the_chosen_tokens_only(llama_server: ServerProcess) -> None:
    done = run_cli(
        "generate", "Hello", "--max-new-tokens", "3", *GREEDY, "--logprobs", "0", address=llama_server.address
    )
    assert done.returncode == 0, done.stderr
    rows = done.stderr.splitlines()[1:]
    assert [re.fullmatch(rf"{i}\s+{TOKEN}\s+{LOGPROB}", row) is not None for i, row in enumerate(rows)] == [True] * 3


def test_version() -> None:
    done = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout == f"modelserve-client {version('modelserve-client')}\n"


# ---- 3. a pipe closed early ---------------------------------------------------------------------------------------


def test_closed_pipe_exits_141_quietly(llama_server: ServerProcess) -> None:
    """`modelserve-client generate ... | head -c 1`, made deterministic: the pipe holds one page, the output is
    larger than that page plus the byte read, so some write is sure to come after the reader has gone."""
    args = {"max_new_tokens": 1400, "seed": 1, "ignore_eos": True}
    with ModelServeClient(llama_server.address, timeout_s=CALL_TIMEOUT_S) as client:
        text = client.complete("Hello", **args)  # the same seed gives the CLI this same text
    read_end, write_end = os.pipe()
    pipe_size = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    assert len(text.encode()) + 1 > pipe_size + 1, "the output must not fit in the pipe"
    command = [str(CLI), "--address", llama_server.address, "generate", "Hello", "--max-new-tokens", "1400"]
    proc = subprocess.Popen(
        [*command, "--seed", "1", "--ignore-eos"], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    os.close(write_end)
    try:
        assert os.read(read_end, 1)  # what `head -c 1` does, then it exits
    finally:
        os.close(read_end)
    _, stderr = proc.communicate(timeout=CALL_TIMEOUT_S)
    assert proc.returncode == client_cli.EXIT_BROKEN_PIPE == 141
    assert stderr == b"", stderr.decode(errors="replace")


# ---- 4. health and info -------------------------------------------------------------------------------------------


def _aligned(stdout: str) -> dict[str, str]:
    """Checks that every value starts in one column; returns {key: value} (continuation lines left out)."""
    view, columns = {}, set()
    for line in stdout.splitlines():
        key, _, rest = ("", "", line) if line.startswith(" ") else line.partition(":")
        value = rest.lstrip()
        columns.add(len(line) - len(value))
        if key:
            view[key] = value
    assert len(columns) == 1, stdout
    return view


def test_health_human_and_json(llama_server: ServerProcess) -> None:
    human = run_cli("health", address=llama_server.address)
    assert human.returncode == 0, human.stderr
    view = _aligned(human.stdout)
    assert view["state"] == "SERVING" and view["model_loaded"] == "true"
    assert view["device"] == "cpu" and view["kv_cache_budget_tokens"] == "1504"
    # GiB from 1 GiB up: a CUDA build of torch loads its libraries even on a CPU (torch 2.6+cu124: 1.1 GiB)
    assert re.fullmatch(r"\d+\.\d [MG]iB \([\d,]+ bytes\)", view["memory.process_rss_bytes"]), view
    assert re.fullmatch(r"\d+\.\d%", view["kv_cache_usage"]), view
    as_json = run_cli("health", "--json", address=llama_server.address)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["state"] == "SERVER_STATE_SERVING" and data["kvCacheBudgetTokens"] == "1504"


def test_info_human_and_json(llama_server: ServerProcess) -> None:
    human = run_cli("info", address=llama_server.address)
    assert human.returncode == 0, human.stderr
    view = _aligned(human.stdout)
    assert view["architecture"] == "LlamaForCausalLM" and view["model_type"] == "llama"
    assert view["max_max_new_tokens"] == "1503" and view["is_demo"] == "false"
    assert view["special_tokens"].startswith("role='bos' token=")
    as_json = run_cli("info", "--json", address=llama_server.address)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["modelType"] == "llama" and data["maxMaxNewTokens"] == 1503


# ---- 5. a stream the server ends with an error status ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "details"),
    [
        (("--top-k", "-1"), "params.top_k must be in [0, "),
        (("--max-new-tokens", "100000"), "params.max_new_tokens must be in [1, 1503]"),
        (("--logprobs", "21"), "params.top_logprobs must be in [0, 20]"),
    ],
)
def test_rejected_request_prints_status_and_details(
    llama_server: ServerProcess, args: tuple[str, ...], details: str
) -> None:
    done = run_cli("generate", "Hello", *args, "-v", address=llama_server.address)
    assert_quiet_failure(done, 1)
    assert f"error: INVALID_ARGUMENT: {details}" in done.stderr, done.stderr
    assert done.stdout == ""


class _Status(grpc.RpcError, grpc.Call):
    """What grpc raises when a stream ends with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class _FakeClient:
    """Stands in for ModelServeClient: a stream with a last message, then an error status, as the server
    sends when a deadline passes while generating (timing a real one would not be deterministic)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stream(self, prompt: str, params: Any) -> Iterator[pb.GenerateResponse]:
        usage = pb.Usage(input_tokens=3, output_tokens=0)
        yield pb.GenerateResponse(request_id="r1", usage=usage)
        yield pb.GenerateResponse(request_id="r1", text="partial", token_ids=[5, 6], usage=pb.Usage(input_tokens=3))
        yield pb.GenerateResponse(
            request_id="r1",
            usage=pb.Usage(input_tokens=3, output_tokens=2),
            finish_reason=pb.FINISH_REASON_DEADLINE_EXCEEDED,
            timings=pb.Timings(time_to_first_token_seconds=0.25, total_seconds=1.5),
            seed=42,
        )
        raise _Status(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the deadline passed while generating",
            (("grpc-retry-pushback-ms", "1200"),),
        )


@pytest.mark.parametrize("verbose", [True, False])
def test_error_after_a_last_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], verbose: bool
) -> None:
    monkeypatch.setattr(client_cli, "ModelServeClient", _FakeClient)
    with pytest.raises(SystemExit) as exited:
        client_cli.main(["generate", "Hello", *(["-v"] if verbose else [])])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == "partial\n"
    status = "error: DEADLINE_EXCEEDED: the deadline passed while generating\n"
    if verbose:
        assert err == (
            "[FINISH_REASON_DEADLINE_EXCEEDED | 3 in, 2 out | ttft 0.250s, total 1.500s | seed 42 | request r1]\n"
            + status
            + "retry after: 1200 ms (the server's grpc-retry-pushback-ms)\n"
        )
    else:
        assert err == status


# ---- 6. the Python clients' keywords ------------------------------------------------------------------------------


def test_repeated_parameters_take_one_value_or_many() -> None:
    assert list(generation_parameters(stop="ab").stop) == ["ab"]
    assert list(generation_parameters({"stop": "ab"}, stop_token_ids=5).stop_token_ids) == [5]
    assert list(generation_parameters(stop=("a", "b"), stop_token_ids=[1, 2]).stop) == ["a", "b"]


def test_a_map_parameter_takes_a_dict_and_the_text_helpers_take_one_sample() -> None:
    assert dict(generation_parameters(logit_bias={5: -100.0}).logit_bias) == {5: -100.0}
    with ModelServeClient(NOWHERE) as client:  # raised by the call itself, before any RPC
        with pytest.raises(ValueError, match=r"params\.n is 2: this method returns one text"):
            client.generate("x", n=2)
        with pytest.raises(ValueError, match="use stream"):
            client.chat([{"role": "user", "content": "x"}], n=3)


def test_cli_sampling_flags_reach_the_server(llama_server: ServerProcess) -> None:
    """--logit-bias ID=BIAS (+100 forces the token) and the penalties' flags, as the server reads them."""
    out = run_cli(
        *("generate", "Hello", "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos", "--logit-bias"),
        *("42=100", "--presence-penalty", "0.5", "--frequency-penalty", "0.5", "--min-p", "0.1", "-v"),
        address=llama_server.address,
    )
    assert out.returncode == 0, out.stderr
    params = pb.GenerationParameters(max_new_tokens=4, temperature=0, ignore_eos=True, logit_bias={42: 100})
    with grpc.insecure_channel(llama_server.address) as channel:
        forced = list(
            pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="Hello", params=params))
        )
    assert [t for m in forced for t in m.token_ids] == [42] * 4
    assert out.stdout.strip() == "".join(m.text for m in forced).strip()
    bad = run_cli("generate", "Hello", "--logit-bias", "42", address=llama_server.address)
    assert bad.returncode == 2 and "expected ID=BIAS" in bad.stderr


def _unknown_keyword(exc: pytest.ExceptionInfo[TypeError], *accepted: str) -> None:
    message = str(exc.value)
    assert "'max_tokens'" in message, message
    for name in ("max_new_tokens", "stop", "temperature", *accepted):
        assert name in message, message


def test_unknown_keyword_sync() -> None:
    with pytest.raises(TypeError) as exc:
        generation_parameters(max_tokens=3)
    _unknown_keyword(exc)
    with pytest.raises(TypeError) as exc:
        generation_parameters({"max_tokens": 3})
    _unknown_keyword(exc)
    with ModelServeClient(NOWHERE) as client:
        # Raised by the call itself, before any iteration or RPC.
        with pytest.raises(TypeError) as exc:
            client.generate("x", max_tokens=3)
        _unknown_keyword(exc, "priority", "request_id")
        with pytest.raises(TypeError) as exc:
            client.stream("x", max_tokens=3)
        _unknown_keyword(exc, "priority", "request_id")
        with pytest.raises(TypeError) as exc:
            client.complete("x", {"max_tokens": 3})
        _unknown_keyword(exc, "priority", "request_id")
        with pytest.raises(TypeError) as exc:
            client.batch_generate([("x", {"max_tokens": 3})])
        _unknown_keyword(exc)


async def test_unknown_keyword_async() -> None:
    async with AsyncModelServeClient(NOWHERE) as client:
        with pytest.raises(TypeError) as exc:
            client.generate("x", max_tokens=3)
        _unknown_keyword(exc, "priority", "request_id")
        with pytest.raises(TypeError) as exc:
            client.stream("x", max_tokens=3)
        _unknown_keyword(exc, "priority", "request_id")
        with pytest.raises(TypeError) as exc:
            await client.complete("x", max_tokens=3)
        _unknown_keyword(exc, "priority", "request_id")


def _stop_inside(text: str) -> tuple[str, int]:
    """A two-character stop sequence first found at `at`, whose characters both appear earlier, so that
    reading it as separate characters would stop the output sooner."""
    for at in range(1, len(text) - 1):
        stop = text[at : at + 2]
        if text.find(stop) == at and all(c in text[:at] for c in stop) and stop.strip():
            return stop, at
    raise AssertionError(f"no usable stop sequence in {text!r}")


def test_stop_str_is_one_sequence_sync_and_async(llama_server: ServerProcess) -> None:
    greedy: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": 60, "ignore_eos": True}
    with ModelServeClient(llama_server.address, timeout_s=CALL_TIMEOUT_S) as client:
        full = client.complete("Hello", **greedy)
        stop, at = _stop_inside(full)
        messages = list(client.stream("Hello", **greedy, stop=stop))
        assert "".join(m.text for m in messages) == full[:at]
        assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE

    async def complete_async() -> str:
        async with AsyncModelServeClient(llama_server.address, timeout_s=CALL_TIMEOUT_S) as aclient:
            return await aclient.complete("Hello", {**greedy, "stop": stop})

    assert asyncio.run(complete_async()) == full[:at]


def test_a_stream_cancelled_from_another_thread_ends_quietly(long_server: ServerProcess) -> None:
    """The SDK's Stream: one thread reads a reply while another cancels it (how an interactive caller stops
    a reply). The reader's loop simply ends, with no error, the server frees the row, and the same client
    goes on; a Stream cancelled before its first next() is empty."""
    with ModelServeClient(long_server.address, timeout_s=CALL_TIMEOUT_S) as client:
        stream = client.stream("Hello", max_new_tokens=LONG, ignore_eos=True, temperature=0.0)
        got: list[pb.GenerateResponse] = []
        errors: list[BaseException] = []
        arrived = threading.Event()

        def read() -> None:
            try:
                for message in stream:
                    got.append(message)
                    arrived.set()
            except BaseException as exc:
                errors.append(exc)
            finally:
                arrived.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert arrived.wait(CALL_TIMEOUT_S)
        stream.cancel()
        reader.join(CALL_TIMEOUT_S)
        assert not reader.is_alive() and not errors and got and stream.cancelled
        assert got[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED  # stopped mid-reply, not finished
        assert wait_idle(pb_grpc.GenerationServiceStub(client.channel)).requests_running == 0
        unsent = client.stream("Hello")
        unsent.cancel()
        assert list(unsent) == []
        assert client.complete("Hello", max_new_tokens=3, temperature=0.0)
