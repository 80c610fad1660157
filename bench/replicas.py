"""Three replicas behind the client SDK's round robin, under steady streaming load, through both ways a
rolling deploy loses one: SIGTERM (a pod replaced) and SIGKILL (a node lost).

Three `modelserve serve` processes on loopback serve the same tiny model. One AsyncModelServeClient is
given their three addresses and keeps its defaults: round_robin, client-side health checking of
modelserve.v1.GenerationService (gRPC A17) and the retry policy. `concurrency` asyncio tasks run Generate
streams back to back. Which replica served a stream is the `modelserve-server-id` header its server sends
when it accepts one (refusals carry none, so that they stay retryable).

1. Load on all three, until each has served a few streams.
2. SIGTERM the first: its health turns NOT_SERVING (timed on a Watch of our own, like the client's), its
   running streams finish, it exits 0. No call may fail: one it refuses before the client's watch has
   seen NOT_SERVING is retried by the retry policy on the next replica. One stream of LONG_TOKENS, on a
   client of its own, runs on it from before the SIGTERM: seconds long, it holds the drain open.
3. Load on the other two, then SIGKILL the second: the streams running on it fail with UNAVAILABLE (they
   had output, so no policy may repeat them); every other call succeeds on the third, none taking more
   than 2 s from its start.

The replicas run with --max-connection-age-s 1 (the default is 300): every connection is told to go
about once a second, so the run also shows that ageing connections lose no call, and the long stream,
which outlives its connection's age, that they cut no stream.

    python -m bench.replicas                # prints the figures; exits 1 when a pass condition fails
    python -m bench.replicas --write-docs   # and puts them in docs/reliability.md
    tests/test_replicas.py runs the same scenario and asserts the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelserve_client import AsyncModelServeClient
from modelserve_client.client import HEALTH_SERVICE_NAME
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

from bench import harness
from modelserve.server.grpc.servicer import SERVER_ID_KEY

MODEL = "tiny-llama"
CONCURRENCY = 12
MAX_NEW_TOKENS = 32
CONNECTION_AGE_S = 1.0
KV_CACHE_BYTES = 4 << 20  # 8,192 tokens of the tiny Llama (a quarter for the prefix cache): room for the load
PROMPT = "A replica among three"
CALL_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 60.0  # for a phase of the load; a healthy run needs a second or two
WARM_CALLS = 5  # streams each replica serves before the SIGTERM
AFTER_CALLS = 2 * CONCURRENCY  # streams started after a replica left that must have ended before the next step
MAX_GAP_S = 2.0  # the longest a call may take from its start to its success around the SIGKILL
LONG_TOKENS = 1000  # seconds of generation for the tiny model, under this load
JITTER = 1.1  # gRPC ages a connection out up to 10% later than asked


def server_id(server: harness.ServerProcess) -> str:
    """The modelserve-server-id a replica sends: this host's name and its gRPC port."""
    return f"{socket.gethostname()}:{server.address.rsplit(':', 1)[1]}"


@dataclass
class Call:
    """One Generate stream as the client saw it."""

    started_s: float
    server: str = ""  # the replica that accepted it; "" when none did
    ended_s: float | None = None
    code: grpc.StatusCode | None = None
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def code_name(self) -> str:
        return self.code.name if self.code is not None else "none"

    @property
    def seconds(self) -> float:
        assert self.ended_s is not None
        return self.ended_s - self.started_s


class Load:
    """`concurrency` tasks running Generate streams back to back on one stub; every call is kept."""

    def __init__(self, stub: pb_grpc.GenerationServiceStub, request: Any, concurrency: int) -> None:
        self.calls: list[Call] = []
        self._stub, self._request = stub, request
        self._changed = asyncio.Condition()
        self._stopping = False
        self._tasks = [asyncio.create_task(self._run()) for _ in range(concurrency)]

    async def _run(self) -> None:
        while not self._stopping:
            call = Call(time.monotonic())
            self.calls.append(call)
            rpc = self._stub.Generate(self._request, timeout=CALL_TIMEOUT_S)
            try:
                call.server = dict(await rpc.initial_metadata()).get(SERVER_ID_KEY, "")
                async for message in rpc:
                    call.tokens += len(message.token_ids)
                call.code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                call.code = exc.code()
            call.ended_s = time.monotonic()
            async with self._changed:
                self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Until `predicate` holds, checked as each call ends; AssertionError after WAIT_TIMEOUT_S."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), WAIT_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(f"the load did not reach '{what}' within {WAIT_TIMEOUT_S:g}s") from None

    async def stop(self) -> None:
        """Let every task finish the call it is in, then end."""
        self._stopping = True
        await asyncio.gather(*self._tasks)

    def ok_on(self, server: str) -> int:
        return sum(1 for c in self.calls if c.ok and c.server == server)

    def ended_since(self, since_s: float) -> int:
        """Calls started at `since_s` or later that have ended."""
        return sum(1 for c in self.calls if c.started_s >= since_s and c.ended_s is not None)

    def running_on(self, server: str) -> list[Call]:
        """The calls `server` had accepted that had not ended, as the client saw them."""
        return [c for c in self.calls if c.server == server and c.ended_s is None]


class HealthWatch:
    """A grpc.health.v1 Watch of the name the client watches, from the first moment the port answers (its
    channel retries a closed port every 50-200 ms); `seen` holds every status it streamed."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAME)
        self._call = health_pb2_grpc.HealthStub(channel).Watch(request, wait_for_ready=True)
        self.seen: list[str] = []

    async def next(self) -> str:
        message = await asyncio.wait_for(self._call.read(), harness.START_TIMEOUT_S)
        self.seen.append(
            "EOF" if message is grpc.aio.EOF else health_pb2.HealthCheckResponse.ServingStatus.Name(message.status)
        )
        return self.seen[-1]


@asynccontextmanager
async def health_watch(server: harness.ServerProcess) -> AsyncIterator[HealthWatch]:
    """A HealthWatch on `server`, on a channel of its own that is closed with the block."""
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        yield HealthWatch(channel)


async def long_stream(address: str, max_new_tokens: int, running: asyncio.Event) -> Call:
    """One stream through the SDK on `address` alone, longer than its connection's age; `running` is set
    once its first message has arrived (or it has ended)."""
    async with AsyncModelServeClient(address, timeout_s=CALL_TIMEOUT_S) as client:
        call = Call(time.monotonic())
        try:
            async for message in client.stream(PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True):
                running.set()
                call.tokens += len(message.token_ids)
            call.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            call.code = exc.code()
        finally:
            running.set()
        call.ended_s = time.monotonic()
        return call


@dataclass
class Result:
    """What happened, as figures, and the pass conditions with what each saw."""

    concurrency: int
    max_new_tokens: int
    connection_age_s: float
    calls: int = 0
    ok: int = 0
    failed: int = 0
    served: dict[str, int] = field(default_factory=dict)  # successful calls by replica (term, kill, last)
    latency_p50_s: float = 0.0  # of successful calls before the SIGTERM
    running_at_term: int = 0  # the load's streams running on the SIGTERMed replica (the long one besides)
    health_out_s: float = 0.0  # SIGTERM -> NOT_SERVING on a Watch
    drain_exit_s: float = 0.0  # SIGTERM -> the process exited
    running_at_kill: int = 0
    failed_codes: dict[str, int] = field(default_factory=dict)
    max_gap_s: float = 0.0  # the longest start-to-success of the calls that ended after the SIGKILL
    long_stream_s: float = 0.0  # the LONG_TOKENS stream's duration
    long_stream_code: str = ""  # and how it ended
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        return [f"{name}: {detail}" for name, (ok, detail) in self.checks.items() if not ok]


async def scenario(
    model: Path,
    log_dir: Path,
    concurrency: int = CONCURRENCY,
    max_new_tokens: int = MAX_NEW_TOKENS,
    connection_age_s: float = CONNECTION_AGE_S,
) -> Result:
    """Start three replicas of `model` (logs in `log_dir`), run the scenario, stop them."""
    args = ("--model", str(model), "--kv-cache-bytes", str(KV_CACHE_BYTES))
    age = ("--max-connection-age-s", f"{connection_age_s:g}")
    servers = [harness.start_server(log_dir, *args, *age, name=f"replica{i}") for i in range(3)]
    try:
        async with health_watch(servers[0]) as watch:
            while await watch.next() == "NOT_SERVING":
                pass
            for server in servers[1:]:
                await asyncio.to_thread(server.wait_serving)
            result = Result(concurrency, max_new_tokens, connection_age_s)
            await _run(servers, result, watch)
        return result
    finally:
        for server in servers:
            await asyncio.to_thread(server.terminate)


async def _run(servers: list[harness.ServerProcess], result: Result, watch: HealthWatch) -> None:
    """The three steps, with `watch` on the first replica (already SERVING)."""
    term, kill, last = servers
    ids = [server_id(s) for s in servers]
    term_id, kill_id, last_id = ids
    request = harness.generate_request(PROMPT, result.max_new_tokens)
    async with AsyncModelServeClient([s.address for s in servers], timeout_s=CALL_TIMEOUT_S) as client:
        load = Load(pb_grpc.GenerationServiceStub(client.channel), request, result.concurrency)
        long_running = asyncio.Event()
        long_task = asyncio.create_task(long_stream(term.address, LONG_TOKENS, long_running))
        await asyncio.wait_for(long_running.wait(), WAIT_TIMEOUT_S)
        await load.wait_until(lambda: all(load.ok_on(i) >= WARM_CALLS for i in ids), "every replica served")

        term_s = time.monotonic()
        term.proc.send_signal(signal.SIGTERM)
        result.running_at_term = len(load.running_on(term_id))
        await watch.next()
        out_s = time.monotonic()
        term_code = await asyncio.to_thread(term.proc.wait, WAIT_TIMEOUT_S)  # once the long stream has ended
        exit_s = time.monotonic()
        long = await asyncio.wait_for(long_task, WAIT_TIMEOUT_S)
        await load.wait_until(lambda: load.ended_since(exit_s) >= AFTER_CALLS, "calls after the SIGTERM")

        running = load.running_on(kill_id)
        kill_s = time.monotonic()
        kill.proc.kill()
        await asyncio.to_thread(kill.proc.wait, WAIT_TIMEOUT_S)
        dead_s = time.monotonic()
        await load.wait_until(
            lambda: load.ended_since(dead_s) >= AFTER_CALLS and all(c.ended_s is not None for c in running),
            "calls after the SIGKILL",
        )
        await load.stop()
    last_code = await asyncio.to_thread(last.terminate)

    calls = load.calls
    ok = [c for c in calls if c.ok]
    failed = [c for c in calls if not c.ok]
    result.calls, result.ok, result.failed = len(calls), len(ok), len(failed)
    result.served = {i: sum(1 for c in ok if c.server == i) for i in ids}
    result.latency_p50_s = statistics.median(c.seconds for c in ok if c.ended_s is not None and c.ended_s < term_s)
    result.health_out_s = out_s - term_s
    result.drain_exit_s = exit_s - term_s
    result.running_at_kill = len(running)
    for c in failed:
        result.failed_codes[c.code_name] = result.failed_codes.get(c.code_name, 0) + 1
    around_kill = [c.seconds for c in ok if c.ended_s is not None and c.ended_s >= kill_s]
    result.max_gap_s = max(around_kill)
    result.long_stream_s, result.long_stream_code = long.seconds, long.code_name

    on_term = [c for c in calls if c.server == term_id]
    elsewhere = [c for c in failed if c.server != kill_id or c.started_s >= dead_s]
    result.checks = {
        "the health Watch streamed every change: NOT_SERVING, SERVING, then NOT_SERVING at the SIGTERM": (
            watch.seen == ["NOT_SERVING", "SERVING", "NOT_SERVING"],
            f"{', '.join(watch.seen)}; the last {result.health_out_s * 1000:.1f} ms after the SIGTERM",
        ),
        "SIGTERM: every call it accepted succeeded, none after its NOT_SERVING": (
            all(c.ok for c in on_term) and all(c.started_s < out_s for c in on_term),
            f"{len(on_term)} calls, {sum(1 for c in on_term if not c.ok)} failed, "
            f"{sum(1 for c in on_term if c.started_s >= out_s)} started after NOT_SERVING",
        ),
        "SIGTERM: it drained and exited 0": (term_code == 0, f"exit code {term_code} after {result.drain_exit_s:.2f}s"),
        "SIGKILL: streams were running on it": (len(running) > 0, f"{len(running)}"),
        "SIGKILL: only streams it was running failed, with UNAVAILABLE": (
            not elsewhere and set(result.failed_codes) <= {"UNAVAILABLE"},
            f"{len(failed)} failed ({result.failed_codes}); {len(elsewhere)} of them elsewhere or started "
            f"after it died; {len(running)} running on it at the kill as the client saw it",
        ),
        f"SIGKILL: every other call succeeded within {MAX_GAP_S:g}s": (
            result.max_gap_s < MAX_GAP_S,
            f"the longest start-to-success around the kill: {result.max_gap_s * 1000:.0f} ms",
        ),
        "SIGTERM: the long stream, through its connection's ages and the drain, was not cut": (
            long.ok and long.tokens == LONG_TOKENS and result.long_stream_s > JITTER * result.connection_age_s,
            f"{result.long_stream_code}, {long.tokens} tokens in {result.long_stream_s:.1f}s "
            f"on a connection aged out after {result.connection_age_s:g}s",
        ),
        "every success had all its tokens": (
            all(c.tokens == result.max_new_tokens for c in ok),
            f"{sum(1 for c in ok if c.tokens != result.max_new_tokens)} short",
        ),
        "the third replica served after both left, and exited 0": (
            any(c.ok and c.server == last_id and c.started_s >= dead_s for c in calls) and last_code == 0,
            f"exit code {last_code}",
        ),
        "no errors in the logs of the replicas that exited": (
            not term.log_errors() and not last.log_errors(),
            "; ".join(term.log_errors() + last.log_errors()) or "none",
        ),
    }


def table(result: Result) -> str:
    """The figures and the pass conditions, as markdown."""
    served = " / ".join(str(n) for n in result.served.values())
    codes = ", ".join(f"{code} {n}" for code, n in result.failed_codes.items()) or "-"
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| requests | {result.calls} |",
        f"| succeeded (SIGTERMed / SIGKILLed / last replica) | {result.ok} ({served}) |",
        f"| failed | **{result.failed}** ({codes}) |",
        f"| latency p50 before the SIGTERM | {result.latency_p50_s * 1000:.0f} ms |",
        f"| SIGTERM: streams running on the replica | {result.running_at_term} and the long one |",
        f"| SIGTERM: until its health Watch said NOT_SERVING | {result.health_out_s * 1000:.1f} ms |",
        f"| SIGTERM: until the replica had drained (the long stream ended) and exited | {result.drain_exit_s:.2f} s |",
        f"| SIGKILL: streams running on the replica (as the client saw them) | {result.running_at_kill} |",
        f"| SIGKILL: longest start-to-success of the calls that ended after it | {result.max_gap_s * 1000:.0f} ms |",
        f"| the long stream ({LONG_TOKENS} tokens) on the SIGTERMed replica | "
        f"{result.long_stream_s:.1f} s, {result.long_stream_code} |",
        "",
        "Pass conditions:",
        "",
    ]
    lines += [f"- {name}: {'pass' if ok else '**FAIL**'} ({detail})" for name, (ok, detail) in result.checks.items()]
    return "\n".join(lines) + "\n"


def markdown(result: Result, info: dict[str, str]) -> str:
    details = (
        f"{result.concurrency} streams at once, back to back, {result.max_new_tokens} new tokens each; "
        "one AsyncModelServeClient over the three addresses (round_robin, health checking, retries); "
        f"--max-connection-age-s {result.connection_age_s:g}"
    )
    title = "Three replicas through a rolling deploy: tiny llama on CPU"
    return "\n".join(harness.header(title, info, details)) + "\n" + table(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/reliability.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()
    model = harness.model_dir(MODEL, ns.cache_dir)
    info = harness.run_info("cpu", "bench.replicas")
    result = asyncio.run(scenario(model, harness.RESULTS))
    table = markdown(result, info)
    harness.save("replicas", {**info, **dataclasses.asdict(result)}, table)
    if ns.write_docs:
        harness.write_docs("reliability.md", "replicas", table)
    problems = result.problems()
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("all pass conditions met")


if __name__ == "__main__":
    main()
