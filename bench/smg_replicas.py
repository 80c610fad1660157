"""Three replicas behind the smg router under streaming load, through both ways a rolling deploy loses one:
SIGTERM (a pod replaced) and SIGKILL (a node lost). The scenario of bench/replicas.py, with smg in place of
the client SDK's round robin, as a gateway deployment runs it.

Three `modelserve serve` processes serve the same tiny model; `smg launch --worker-urls grpc://...
--policy cache_aware` (PyPI `smg`) routes to their vLLM face. `concurrency` tasks stream completions
through smg's OpenAI API back to back, with distinct prompts, the client retrying nothing: whatever a
replica's loss costs shows up as a failed request. A request succeeds when its stream ends with a
finish_reason after all its tokens.

1. Load until every replica has served a few requests (their own request counters say so).
2. SIGTERM the first: it refuses what smg still sends it with UNAVAILABLE ("retry on another replica"),
   which smg retries on another worker; its running streams finish. No request may fail.
3. Load on the other two, then SIGKILL the second: only the streams it was running may fail (each
   started before the kill); everything sent later succeeds on the third.

    python -m bench.smg_replicas                # prints the figures; exits 1 when a pass condition fails
    python -m bench.smg_replicas --write-docs   # and puts them in docs/gateway.md
    tests/test_smg.py runs the same scenario and asserts the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import harness

MODEL = "tiny-llama"
CONCURRENCY = 8
MAX_TOKENS = 32
KV_CACHE_BYTES = 4 << 20  # 8,192 tokens of the tiny Llama: room for the load
CALL_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 60.0  # for a phase of the load; a healthy run needs a second or two
START_TIMEOUT_S = 60.0
WARM_CALLS = 5  # requests each replica serves before the SIGTERM
AFTER_CALLS = 3 * CONCURRENCY  # requests started after a replica left that must have ended before the next step
FINISHED = "modelserve_requests_finished_total"
RUNNING = "vllm:num_requests_running"


def smg_binary() -> str | None:
    """smg's launcher: on PATH, or in the project's .venv (`make install` puts it there)."""
    local = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "smg"
    return shutil.which("smg") or (str(local) if local.exists() else None)


@dataclass
class Router:
    """A running `smg launch`: its OpenAI base URL and its log."""

    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def router(servers: list[harness.ServerProcess], log_dir: Path, *extra: str) -> Iterator[Router]:
    """smg in front of `servers`' vLLM faces (cache_aware), once it serves a completion (it has found a worker
    and fetched the tokenizer); stopped with the block."""
    smg = smg_binary()
    assert smg is not None, "smg is not installed: `pip install smg==1.13.0`"
    port, metrics_port = harness.free_port(), harness.free_port()
    log_path = log_dir / f"smg-{port}.log"
    command = [smg, "launch", "--worker-urls", *(f"grpc://{s.address}" for s in servers)]
    command += ["--policy", "cache_aware", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--prometheus-port", str(metrics_port), "--log-level", "info", *extra]
    log_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Router(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        status = harness.wait_until(lambda: _completion_status(running.base), lambda s: s == 200, START_TIMEOUT_S)
        assert status == 200, f"smg did not serve a completion in {START_TIMEOUT_S:g} s:\n{running.log()[-3000:]}"
        yield running
    finally:  # the launcher's whole session: `smg launch` starts the router as a process of its own
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        _signal_group(proc, signal.SIGKILL)  # whatever of it outlived the launcher, or would not stop
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group has ended
        os.killpg(proc.pid, signum)


def served_model(base: str) -> str:
    with httpx.Client(timeout=10) as client:
        return str(client.get(f"{base}/v1/models").json()["data"][0]["id"])


def _completion_status(base: str) -> int:
    """The status of a one-token completion through smg (0 while it is not listening)."""
    try:
        with httpx.Client(timeout=10) as client:
            body = {"model": served_model(base), "prompt": "Hi", "max_tokens": 1}
            return client.post(f"{base}/v1/completions", json=body).status_code
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return 0


@dataclass
class Call:
    """One streamed completion as the client saw it."""

    started_s: float
    ended_s: float | None = None
    status: int = 0
    tokens: int = 0  # completion tokens, as the stream's usage chunk counts them
    finish_reason: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish_reason is not None and not self.error

    @property
    def seconds(self) -> float:
        assert self.ended_s is not None
        return self.ended_s - self.started_s


class Load:
    """`concurrency` tasks streaming completions through smg back to back; every call is kept."""

    def __init__(self, base: str, model: str, concurrency: int) -> None:
        self.calls: list[Call] = []
        self._base, self._model = base, model
        self._changed = asyncio.Condition()
        self._stopping = False
        self._client = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=httpx.Limits(max_connections=concurrency))
        self._tasks = [asyncio.create_task(self._run(task)) for task in range(concurrency)]

    async def _run(self, task: int) -> None:
        n = 0
        while not self._stopping:
            n += 1
            call = Call(time.monotonic())
            self.calls.append(call)
            body = {
                "model": self._model,
                # Distinct from the first character: no cached prefix draws it, so cache_aware spreads by load.
                "prompt": f"{task}.{n} {uuid.uuid4().hex}: a replica among three",
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            try:
                await self._stream(call, body)
            except httpx.HTTPError as exc:
                call.error = f"{type(exc).__name__}: {exc}"
            call.ended_s = time.monotonic()
            async with self._changed:
                self._changed.notify_all()

    async def _stream(self, call: Call, body: dict[str, object]) -> None:
        async with self._client.stream("POST", f"{self._base}/v1/completions", json=body) as response:
            call.status = response.status_code
            if response.status_code != 200:
                call.error = (await response.aread()).decode(errors="replace")[:300]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    call.error = json.dumps(chunk["error"])[:300]
                    return
                for choice in chunk.get("choices", ()):
                    call.finish_reason = choice.get("finish_reason") or call.finish_reason
                if chunk.get("usage"):
                    call.tokens = int(chunk["usage"]["completion_tokens"])

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Until `predicate` holds, checked as each call ends; AssertionError after WAIT_TIMEOUT_S."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), WAIT_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(f"the load did not reach '{what}' within {WAIT_TIMEOUT_S:g}s") from None

    async def wait_next(self) -> None:
        """Until one more call has ended."""
        ended = sum(1 for c in self.calls if c.ended_s is not None)
        await self.wait_until(lambda: sum(1 for c in self.calls if c.ended_s is not None) > ended, "one more call")

    async def stop(self) -> None:
        """Let every task finish the call it is in, then end."""
        self._stopping = True
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    def ended_since(self, since_s: float) -> int:
        """Calls started at `since_s` or later that have ended."""
        return sum(1 for c in self.calls if c.started_s >= since_s and c.ended_s is not None)

    def running(self) -> list[Call]:
        return [c for c in self.calls if c.ended_s is None]


@dataclass
class Result:
    """What happened, as figures, and the pass conditions with what each saw."""

    concurrency: int
    max_tokens: int
    calls: int = 0
    ok: int = 0
    failed: int = 0
    served: list[int] = field(default_factory=list)  # requests finished by each replica (term, kill, last)
    latency_p50_s: float = 0.0  # of successful calls before the SIGTERM
    running_at_term: int = 0  # the SIGTERMed replica's running requests just before the signal
    drain_exit_s: float = 0.0  # SIGTERM -> the process exited
    running_at_kill: int = 0  # the SIGKILLed replica's running requests just before the signal
    failed_at_kill: int = 0
    failures: list[str] = field(default_factory=list)
    max_after_kill_s: float = 0.0  # the longest start-to-success of the calls started after the SIGKILL
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        return [f"{name}: {detail}" for name, (ok, detail) in self.checks.items() if not ok]


async def scenario(model: Path, log_dir: Path, concurrency: int = CONCURRENCY) -> Result:
    """Start three replicas of `model` and smg before them (logs in `log_dir`), run the scenario, stop all."""
    args = ("--model", str(model), "--kv-cache-bytes", str(KV_CACHE_BYTES))
    servers = [harness.start_server(log_dir, *args, name=f"replica{i}") for i in range(3)]
    try:
        for server in servers:
            await asyncio.to_thread(server.wait_serving)
        with router(servers, log_dir) as smg:
            result = Result(concurrency, MAX_TOKENS)
            await _run(servers, smg, result)
            return result
    finally:
        await asyncio.to_thread(harness.terminate_all, servers)


def _finished(servers: list[harness.ServerProcess]) -> list[float]:
    return [s.metric(FINISHED) if s.proc.poll() is None else 0.0 for s in servers]


async def _running_on(server: harness.ServerProcess, load: Load) -> int:
    """The requests `server` is running, once it runs some (read as calls end, so a moment the load has
    streams on it is found whatever the router's choices)."""
    for _ in range(100):
        running = int(await asyncio.to_thread(server.metric, RUNNING))
        if running:
            return running
        await load.wait_next()
    raise AssertionError(f"{server.address} ran no request while 100 calls ended")


async def _run(servers: list[harness.ServerProcess], smg: Router, result: Result) -> None:
    term, kill, last = servers
    base_counts = await asyncio.to_thread(_finished, servers)
    load = Load(smg.base, await asyncio.to_thread(served_model, smg.base), result.concurrency)
    try:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:  # the replicas count what they serve; smg does not say where it sent a request
            counts = await asyncio.to_thread(_finished, servers)
            if all(now - then >= WARM_CALLS for now, then in zip(counts, base_counts, strict=True)):
                break
            assert time.monotonic() < deadline, f"not every replica served {WARM_CALLS} requests: {counts}"
            await load.wait_next()
        served_term = await asyncio.to_thread(term.metric, FINISHED)
        result.running_at_term = await _running_on(term, load)
        term_s = time.monotonic()
        term.proc.send_signal(signal.SIGTERM)
        term_code = await asyncio.to_thread(term.proc.wait, WAIT_TIMEOUT_S)
        exit_s = time.monotonic()
        await load.wait_until(lambda: load.ended_since(exit_s) >= AFTER_CALLS, "calls after the SIGTERM")
        failed_by_term = [c for c in load.calls if not c.ok and c.ended_s is not None]

        result.running_at_kill = await _running_on(kill, load)
        kill_s = time.monotonic()
        kill.proc.kill()
        await asyncio.to_thread(kill.proc.wait, WAIT_TIMEOUT_S)
        dead_s = time.monotonic()
        running = load.running()
        await load.wait_until(
            lambda: load.ended_since(dead_s) >= AFTER_CALLS and all(c.ended_s is not None for c in running),
            "calls after the SIGKILL",
        )
    finally:
        await load.stop()
    last_counts = await asyncio.to_thread(_finished, [last])

    calls = load.calls
    ok = [c for c in calls if c.ok]
    failed = [c for c in calls if not c.ok]
    result.calls, result.ok, result.failed = len(calls), len(ok), len(failed)
    result.served = [int(served_term - base_counts[0]), 0, int(last_counts[0] - base_counts[2])]
    result.latency_p50_s = statistics.median(c.seconds for c in ok if c.ended_s is not None and c.ended_s < term_s)
    result.drain_exit_s = exit_s - term_s
    result.failures = sorted({f"{c.status} {c.error}"[:200] for c in failed})
    at_kill = [c for c in failed if c.started_s < kill_s and c not in failed_by_term]
    late = [c for c in failed if c.started_s >= kill_s]
    result.failed_at_kill = len(at_kill)
    after = [c.seconds for c in ok if c.started_s >= dead_s]
    result.max_after_kill_s = max(after) if after else 0.0
    result.checks = {
        "SIGTERM: no request failed": (not failed_by_term, f"{len(failed_by_term)} failed"),
        "SIGTERM: it drained and exited 0": (term_code == 0, f"exit code {term_code} after {result.drain_exit_s:.2f}s"),
        "SIGKILL: only streams that had begun before it failed": (
            not late and len(at_kill) <= result.concurrency,
            f"{len(at_kill)} failed that began before the kill ({result.running_at_kill} running on it just "
            f"before), {len(late)} that began after",
        ),
        "every success had all its tokens": (
            all(c.tokens == result.max_tokens for c in ok),
            f"{sum(1 for c in ok if c.tokens != result.max_tokens)} short",
        ),
        "the third replica served after both left": (
            any(c.ok and c.started_s >= dead_s for c in calls),
            f"{len(after)} succeeded after the kill",
        ),
        "no errors in the logs of the replicas that lived": (
            not term.log_errors() and not last.log_errors(),
            "; ".join(term.log_errors() + last.log_errors()) or "none",
        ),
    }


def table(result: Result) -> str:
    """The figures and the pass conditions, as markdown."""
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| requests | {result.calls} |",
        f"| succeeded | {result.ok} |",
        f"| failed | **{result.failed}** |",
        f"| served by the SIGTERMed replica before it left / by the last one | "
        f"{result.served[0]} / {result.served[2]} |",
        f"| latency p50 before the SIGTERM | {result.latency_p50_s * 1000:.0f} ms |",
        f"| SIGTERM: requests running on the replica | {result.running_at_term} |",
        f"| SIGTERM: until the replica had drained and exited | {result.drain_exit_s:.2f} s |",
        f"| SIGKILL: requests running on the replica just before | {result.running_at_kill} |",
        f"| SIGKILL: requests that failed (all begun before it) | {result.failed_at_kill} |",
        f"| SIGKILL: longest request started after it | {result.max_after_kill_s * 1000:.0f} ms |",
        "",
        "Pass conditions:",
        "",
    ]
    lines += [f"- {name}: {'pass' if ok else '**FAIL**'} ({detail})" for name, (ok, detail) in result.checks.items()]
    if result.failures:
        lines += ["", "What the failed requests got:", ""] + [f"- `{f}`" for f in result.failures]
    return "\n".join(lines) + "\n"


def markdown(result: Result, info: dict[str, str]) -> str:
    details = (
        f"{result.concurrency} streamed completions at once through smg (cache_aware), back to back, "
        f"{result.max_tokens} tokens each, the client retrying nothing"
    )
    title = "Three replicas behind smg through a rolling deploy: tiny llama on CPU"
    return "\n".join(harness.header(title, info, details)) + "\n" + table(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/gateway.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()
    model = harness.model_dir(MODEL, ns.cache_dir)
    info = harness.run_info("cpu", "bench.smg_replicas")
    result = asyncio.run(scenario(model, harness.RESULTS / "smg-replicas"))
    text = markdown(result, info)
    harness.save("smg_replicas", {**info, **dataclasses.asdict(result)}, text)
    if ns.write_docs:
        harness.write_docs("gateway.md", "smg_replicas", text)
    problems = result.problems()
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("all pass conditions met")


if __name__ == "__main__":
    main()
