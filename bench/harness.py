"""What the benchmarks and the tests share, one of each: a real `modelserve serve` process, the wait until
it is idle, the random-weight models they serve, their prompts and Generate requests, a percentile, arms
measured side by side (a closed loop on an in-process engine, alternating repeats, medians, goals), and the
reports' header, result files and docs sections.

tests/ imports it as `bench.harness` (pytest runs from the repository root, which is then on sys.path).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE_DIR = Path.home() / ".cache" / "modelserve"
START_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 60.0
T = TypeVar("T")

# ---- a real server ----------------------------------------------------------------------------------------------


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never given before by this process: the kernel may hand the same free
    port to two binds in a row (seen about once in 5,000 triples), and a server's ports must differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


@dataclass
class ServerProcess:
    """A `modelserve serve` process on a loopback port, its output in a log file."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    metrics_port: int
    http_port: int  # the OpenAI-compatible HTTP API's (0: off)

    def channel(self) -> grpc.Channel:
        # Retry a not-yet-open port quickly, so a Watch sees the server from its first moment.
        return grpc.insecure_channel(
            self.address, options=[("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_errors(self) -> list[str]:
        return log_errors(self.log())

    def metric(self, sample_name: str, **labels: str) -> float:
        """The sum of the /metrics samples named `sample_name` whose labels include `labels` (0 when none)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            families = text_string_to_metric_families(response.read().decode())
            return sum(
                sample.value
                for family in families
                for sample in family.samples
                if sample.name == sample_name and labels.items() <= sample.labels.items()
            )

    @contextlib.contextmanager
    def watch_health(self, service: str = "", timeout_s: float = START_TIMEOUT_S) -> Iterator[Iterator[int]]:
        """Statuses from grpc.health.v1 Watch, from the first moment the port answers.

        A context manager, not a generator: the call and its channel are closed when the block ends,
        also when a test fails inside it, never later by the garbage collector (closing a sync channel
        from a finalizer can hang the interpreter).
        """
        channel = self.channel()
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=True
        )
        try:
            yield (message.status for message in call)
        finally:
            call.cancel()
            channel.close()

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> list[int]:
        """Block until SERVING (a Watch stream, not polling); return the statuses seen."""
        seen: list[int] = []
        try:
            with self.watch_health(timeout_s=timeout_s) as statuses:
                for status in statuses:
                    seen.append(status)
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return seen
        except grpc.RpcError as exc:
            raise AssertionError(f"server never became SERVING ({exc}); log:\n{self.log()}") from exc
        raise AssertionError(f"health stream ended before SERVING; log:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code; killed (exit code -9) if it has not exited within `timeout_s`."""
        return terminate_all([self], timeout_s)[0]


def terminate_all(servers: list[ServerProcess], timeout_s: float = 60.0) -> list[int]:
    """SIGTERM to every server at once (their drains overlap), then their exit codes; one that has not exited
    within `timeout_s` is killed (exit code -9)."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    codes = []
    for server in servers:
        try:
            codes.append(server.proc.wait(timeout_s))
        except subprocess.TimeoutExpired:
            server.proc.kill()
            codes.append(server.proc.wait())
    return codes


def start_server(log_dir: Path, *args: str, env: dict[str, str] | None = None, name: str = "server") -> ServerProcess:
    """`modelserve serve *args` on free loopback ports (gRPC, --metrics-port and, unless `args` name one,
    --http-port: never the default 8000, which servers started side by side would share), its output in
    log_dir/<name>-<port>.log; returns at once (wait_serving() waits until it serves)."""
    port, metrics_port = free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    address = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
    if "--http-port" in args:
        http_port = int(args[args.index("--http-port") + 1])
    else:
        http_port = free_port()
        address += ["--http-port", str(http_port)]
    if "--dtype" not in args:  # correctness is checked in float32, whatever --dtype auto picks on this CPU
        address += ["--dtype", "float32"]
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelserve", "serve", *address, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return ServerProcess(proc, f"127.0.0.1:{port}", log_path, metrics_port, http_port)


# A record in the server's log format (modelserve.config.LOG_FORMAT), and
# gRPC core's own error and fatal lines (absl: E1130 04:53:41.553 ...).
_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")
_CORE_ERROR = re.compile(r"[EF]\d{4} \d\d:\d\d:\d\d")


def log_errors(log: str) -> list[str]:
    """The errors a server log reports: records at ERROR or CRITICAL, gRPC core's E and F lines, and
    tracebacks that no record carries (an exception nobody caught: a thread's, an "Exception ignored in").

    A traceback that follows a record, or chains onto one that does, belongs to that record: it counts
    with an ERROR record (once), not with a record below ERROR. So what the server logs below ERROR,
    such as a caller's cancel or deadline, is not an error, and whatever it logs at ERROR is one.
    """
    errors: list[str] = []
    previous = ""
    for line in log.splitlines():
        record = _RECORD.match(line)
        at_error = record is not None and record[1] in ("ERROR", "CRITICAL")
        carried = _RECORD.match(previous) or previous.startswith(("During handling", "The above exception"))
        if at_error or _CORE_ERROR.match(line) or (line.startswith("Traceback") and not carried):
            errors.append(line)
        if line.strip():
            previous = line
    return errors


def is_idle(health: Any, kv_tokens_idle: int = 0) -> bool:
    """A detailed HealthResponse with nothing running or waiting, no queued tokens counted and the KV
    cache back to `kv_tokens_idle`."""
    return bool(
        health.requests_running == 0
        and health.requests_waiting == 0
        and health.waiting_tokens == 0
        and health.kv_cache_tokens_used == kv_tokens_idle
    )


def wait_idle(stub: Any, timeout_s: float = IDLE_TIMEOUT_S, until: Callable[[Any], bool] = is_idle) -> Any:
    """Poll the detailed Health RPC of a sync GenerationServiceStub until `until` (is_idle) holds or
    `timeout_s` has passed; return the last HealthResponse, for the caller to assert on. From asyncio
    code, run it in a thread (asyncio.to_thread)."""
    from modelserve_client.v1 import generation_pb2 as pb

    return wait_until(lambda: stub.Health(pb.HealthRequest(), timeout=10), until, timeout_s)


def wait_until(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = IDLE_TIMEOUT_S) -> T:
    """read() once done() holds for it, or when `timeout_s` has passed; the caller asserts on it. For state a
    server records a moment after it answered (an abort reaches the engine at its next step, a metric is
    recorded once the response is out): polled, bounded."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


# ---- models -----------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2-small shape: 12 layers, 768 wide, 50,257 vocabulary.
    "gpt2-small": dict(arch="gpt2", hidden=768, layers=12, heads=12, vocab_size=50257, max_len=4096),
    # A tiny model for a smoke run of a benchmark.
    "tiny": dict(arch="gpt2", max_len=4096),
    # A Llama of GPT-2-small's size (bench/lora_bench.py: LoRA needs the Llama family).
    "llama-small": dict(arch="llama", hidden=768, layers=12, heads=12, vocab_size=32000, max_len=4096),
    # Llama-3.2-1B-like shape (for a lent GPU).
    "llama-1b": dict(arch="llama", hidden=2048, layers=16, heads=32, vocab_size=128256, max_len=4096),
    # The tests' and the soak's: build_random_model's own size (2 layers, 64 wide, a 1,024-token vocabulary,
    # a 2,048-token context), seed 7.
    **{f"tiny-{arch}": dict(arch=arch, seed=7) for arch in ("gpt2", "llama", "qwen2")},
    # The tests' long-running streams: the tiny Llama with an 8,192-token context.
    "tiny-llama-long": dict(arch="llama", seed=7, max_len=8192),
}


def model_dir(preset: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The preset's random-weight model directory, built on first use and kept in cache_dir."""
    from modelserve.models.random_init import build_random_model

    path = cache_dir / f"bench-{preset}"
    if not (path / "config.json").exists():
        print(f"building {preset} with random weights into {path} ...", flush=True)
        spec = {"seed": 0, **PRESETS[preset]}
        build_random_model(path, spec.pop("arch"), **spec)
    return path


def clean_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose text is printable and encodes back to the same id: prompts built from them
    keep their length through decode -> encode, so every run sees the same prompt tokens."""
    ids = []
    for i in range(tokenizer.get_vocab_size()):
        piece = tokenizer.decode([i])
        if piece and piece.isprintable() and "\ufffd" not in piece and tokenizer.encode(piece).ids == [i]:
            ids.append(i)
    return ids


def make_prompt(tokenizer: Any, pool: list[int], length: int, rng: random.Random) -> list[int]:
    """`length` tokens (within one or two) of text, exactly as the tokenizer encodes it."""
    pieces = [rng.choice(pool) for _ in range(length)]
    ids: list[int] = list(tokenizer.encode(tokenizer.decode(pieces)).ids)
    while len(ids) < length:  # neighbouring pieces merge: add more until long enough
        pieces += [rng.choice(pool) for _ in range(length - len(ids))]
        ids = list(tokenizer.encode(tokenizer.decode(pieces)).ids)
    for _ in range(8):  # cut to length; a cut can re-merge at the edge, so settle it
        settled = list(tokenizer.encode(tokenizer.decode(ids[:length])).ids)
        if settled == ids[:length] or len(settled) <= length:
            return settled
        ids = settled
    return ids


def generate_request(prompt: str, max_new: int) -> Any:
    """A greedy GenerateRequest of exactly `max_new` tokens (EOS ignored)."""
    from modelserve_client.v1 import generation_pb2 as pb

    params = pb.GenerationParameters(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(prompt=prompt, params=params)


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- arms measured side by side -------------------------------------------------------------------------------


async def engine_closed_loop(engine: Any, requests: list[Any], concurrency: int) -> tuple[int, float]:
    """`requests` (the engine's Requests) through an in-process engine from `concurrency` clients, each sending
    the next as its last one ends: the output tokens and the wall seconds."""
    todo = list(requests)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while todo:
            async for event in engine.submit(todo.pop(0)):
                tokens += len(event.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens, time.perf_counter() - start


async def alternate(
    arms: tuple[str, ...], repeats: int, measure: Callable[[str], Awaitable[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Each arm measured once per repeat, in reversed order every other repeat, so a noisy machine's drift
    falls on every arm alike: the results, each with its arm's name and its repeat."""
    runs = []
    for repeat in range(1, repeats + 1):
        for name in arms if repeat % 2 else tuple(reversed(arms)):
            result = await measure(name)
            print(f"  repeat {repeat} {name}: {result['tok_per_s']:.1f} tok/s", flush=True)
            runs.append({**result, "arm": name, "repeat": repeat})
    return runs


def medians(runs: list[dict[str, Any]], arms: tuple[str, ...], key: str = "tok_per_s") -> dict[str, float]:
    """Each arm's median `key` over its runs."""
    return {name: statistics.median(r[key] for r in runs if r["arm"] == name) for name in arms}


def goal_cell(ratio: float, goal: float | None) -> str:
    """A table's goal column: met or MISSED against a minimum ratio, or "-" where the arm has none."""
    return "-" if goal is None else ("met" if ratio >= goal else "MISSED") + f" (>= {goal}x)"


# ---- reports ----------------------------------------------------------------------------------------------------


def run_info(device: str, module: str) -> dict[str, str]:
    """Date, machine, versions and command line of this run, for a report's JSON and its header."""
    import torch
    import transformers

    if device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs ({cpu_model()})"
    else:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), no GPU"
    return {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, grpcio {grpc.__version__}",
        "command": " ".join(["python -m", module, *sys.argv[1:]]),
        "commit": _commit(),
    }


def cpu_model() -> str:
    """The CPU's name and the instructions its figures hang on. This workplace's machines change between
    sessions (an Intel CPU with AMX one day, an AMD Zen 4 without it the next, its bf16 products at 32 rows
    1.35-1.5x slower), so a figure is only comparable with one taken on the same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    name = fields.get("model name") or fields.get("CPU part") or platform.processor() or platform.machine()
    if "flags" in fields:  # x86
        flags = set(fields["flags"].split())
        wanted = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
        isa = next((label for flag, label in wanted if flag in flags), "no AVX2")
        return f"{name}, {isa}" + (", no AMX" if isa == "AVX512-BF16" else "")
    features = set(fields.get("Features", "").split())  # Arm
    return ", ".join([name, *(label for flag, label in [("sve", "SVE"), ("bf16", "BF16")] if flag in features)])


def _commit() -> str:
    """The commit the measured code came from; `+changes` when the tree differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "src", "bench") else "")


def header(title: str, info: dict[str, Any], *details: str) -> list[str]:
    """A report's first lines: its title, then date, machine, versions, command and `details` as a list."""
    return [
        f"### {title}",
        "",
        f"- date: {info['date']}; commit: {info['commit']}; machine: {info['machine']}",
        f"- versions: {info['versions']}",
        f"- command: `{info['command']}`",
        *(f"- {detail}" for detail in details),
        "",
    ]


def save(stem: str, report: dict[str, Any], table: str) -> None:
    """Write bench/results/<stem>-<time>.json and .md, and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stem}-{stamp}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{stem}-{stamp}.md").write_text(table)
    print("\n" + table)


def write_docs(doc: str, marker: str, section: str) -> None:
    """Put `section` between `<!-- marker:begin -->` and `<!-- marker:end -->` in docs/<doc>, or at its
    end where the markers are not there yet."""
    path = ROOT / "docs" / doc
    text = path.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
