"""Soak and overload: does modelserve stay correct, leak-free and responsive under abuse?

Each scenario starts a real `modelserve serve` process of its own (bench.harness), serving the tests'
tiny seeded Llama, and drives it with grpc.aio clients from this process; docs/reliability.md says
what each does and checks.

SOAK  thousands of Generate streams at bounded concurrency, a seeded mix of normal greedy requests,
      client cancellations, short deadlines, deadlines that expire while generating, disconnects (a
      channel of its own, closed mid-stream) and crashed clients (a child process that os._exit()s
      mid-stream). Every output is checked against a lone reference request per prompt: exact when
      complete, a prefix when cut short. Then, once the Health RPC says idle: no leaked rows, queued
      tokens or KV, RSS within a bound of its value after a warm-up, the server still correct, no
      errors in its log, a clean exit on SIGTERM.
OVERLOAD  the capacity (closed loop at concurrency = max_batch_size), then Poisson arrivals at 10x its
      request rate against a small --max-waiting-requests: refusals (RESOURCE_EXHAUSTED with
      grpc-retry-pushback-ms) and how fast they come, every admitted request correct, the same leak
      and log checks, and a probe that the waiting queue takes max_waiting_requests again.

Writes JSON and markdown to bench/results/ (the servers' logs beside them), with --write-docs the
table into docs/reliability.md, and exits 1 when a pass condition fails. tests/test_soak.py runs both
scenarios at small scale through the functions here.

    python -m bench.soak              # make soak: 8,000 streams, about 5-10 minutes on 2 CPUs
    python -m bench.soak --quick      # a few hundred streams, about a minute
    python -m bench.soak --scenario overload --quick
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from bench.harness import (
    CACHE_DIR,
    RESULTS,
    ROOT,
    ServerProcess,
    header,
    is_idle,
    model_dir,
    pct,
    run_info,
    save,
    start_server,
    wait_idle,
    write_docs,
)
from bench.serving_bench import clean_token_ids, make_prompt

MODEL = "tiny-llama"  # the tests' model: 2 layers, 64 wide, a 1,024-token vocabulary, seed 7
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
GENEROUS_TIMEOUT_S = 120.0  # for requests that are meant to complete
MIB = 1 << 20

# The mix of the soak (weights); crashed clients come on top, one every `crash_every` requests.
MIX = {
    "normal": 0.55,
    "cancel": 0.12,
    "deadline_short": 0.08,
    "deadline_running": 0.12,
    "disconnect": 0.13,
}
# Every way a stream can end, as this script sees it.
STATUSES = (
    "completed",
    "cancelled",
    "disconnected",
    "crashed",
    "deadline_at_admission",  # DEADLINE_EXCEEDED before the first message (refused, or expired in transit)
    "deadline_waiting",  # after the first message, before any token
    "deadline_running",  # after tokens had arrived
    "rejected",  # RESOURCE_EXHAUSTED
    "error",  # anything else: must not happen
)


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 8000  # streams in the measured phase (crashed clients' streams included)
    warmup: int = 800  # streams of the same mix before the RSS baseline
    concurrency: int = 32
    channels: int = 4  # shared channels; disconnects get their own
    prompts: int = 32
    max_new: int = 96  # reference length; requests ask for 1..max_new
    long_prompt_share: float = 0.25  # prompts of 128-400 tokens, prefilled over several steps
    max_batch_size: int = 8
    kv_tokens: int = 4096  # the server's KV budget, in tokens (--kv-cache-bytes)
    crash_every: int = 150
    crash_streams: int = 4
    seed: int = 1
    idle_timeout_s: float = 60.0
    # RSS may grow by at most max(32 MiB, 5%) from after the warm-up to the end. Past the warm-up a
    # leak-free server is flat (allocator pools, the KV pool within its budget and gRPC's buffers have
    # reached their peak; measured: under 1 MiB over thousands of streams), so 32 MiB is well above
    # the noise yet catches a leak of 4 KiB a stream over 8,000 streams.
    rss_bound_mib: float = 32.0
    rss_bound_frac: float = 0.05


QUICK_SOAK = SoakConfig(requests=240, warmup=60, concurrency=24, prompts=12, max_new=48, crash_every=80)


@dataclass(frozen=True)
class OverloadConfig:
    max_batch_size: int = 8
    max_waiting_requests: int = 8
    capacity_requests: int = 160  # closed loop at concurrency = max_batch_size
    # Long enough that the offered rate stays within what one Python process can answer: every RPC,
    # a refused one too, costs the server a few ms of its one core here (see docs/reliability.md).
    new_tokens: int = 256
    factor: float = 10.0  # offered rate = factor x the measured capacity (requests/s)
    overload_s: float = 30.0
    prompts: int = 16
    seed: int = 2
    idle_timeout_s: float = 60.0


QUICK_OVERLOAD = OverloadConfig(capacity_requests=24, new_tokens=128, overload_s=5.0, prompts=8)


# ---- prompts, references, one stream ------------------------------------------------------------------------------


@dataclass
class Reference:
    prompt: str
    ids: list[int]
    text: str
    lone_s: float


@dataclass
class Outcome:
    kind: str
    status: str
    latency_s: float
    messages: int = 0
    tokens: int = 0
    max_new: int = 0
    ttft_s: float | None = None
    problem: str = ""  # what was wrong with the output (empty: correct or nothing to check)
    error: str = ""  # the status and message of an unexpected failure
    pushback_ms: int | None = None
    retry_hint: bool = False


def make_prompts(tokenizer: Any, n: int, long_share: float, rng: random.Random) -> list[str]:
    pool = clean_token_ids(tokenizer)
    prompts = []
    for i in range(n):
        long = i < round(n * long_share)
        length = rng.randint(128, 400) if long else rng.randint(4, 48)
        prompts.append(tokenizer.decode(make_prompt(tokenizer, pool, length, rng)))
    return prompts


def generate_request(prompt: str, max_new: int) -> Any:
    from modelserve_client.v1 import generation_pb2 as pb

    params = pb.GenerationParameters(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(prompt=prompt, params=params)


async def compute_references(stub: Any, prompts: list[str], max_new: int, tokenizer: Any) -> list[Reference]:
    """Each prompt's greedy output, from a lone request on an idle server."""
    refs = []
    for prompt in prompts:
        start = time.perf_counter()
        ids: list[int] = []
        text: list[str] = []
        async for message in stub.Generate(generate_request(prompt, max_new), timeout=GENEROUS_TIMEOUT_S):
            ids.extend(message.token_ids)
            text.append(message.text)
        if len(ids) != max_new:
            raise RuntimeError(f"a lone reference request gave {len(ids)} tokens, not {max_new}")
        refs.append(Reference(prompt, ids, "".join(text), time.perf_counter() - start))
    return refs


class Checker:
    """Greedy outputs against the references: exact when complete, a prefix when cut short."""

    def __init__(self, refs: list[Reference], tokenizer: Any) -> None:
        self.refs = refs
        self._tokenizer = tokenizer

    def problem(self, ref_index: int, ids: list[int], text: str, max_new: int, complete: bool) -> str:
        ref = self.refs[ref_index]
        if ids != ref.ids[: len(ids)]:
            at = next(i for i, (a, b) in enumerate(zip(ids, ref.ids, strict=False)) if a != b) if ids else 0
            return f"prompt {ref_index}: token ids differ from the reference at position {at}"
        if not complete:
            return ""
        if len(ids) != max_new:
            return f"prompt {ref_index}: {len(ids)} tokens, expected {max_new}"
        want = ref.text if max_new == len(ref.ids) else self._tokenizer.decode(ids, skip_special_tokens=True)
        if text != want:
            return f"prompt {ref_index}: text {text[-40:]!r} differs from {want[-40:]!r} (n={max_new})"
        return ""


async def run_stream(
    stub: Any,
    checker: Checker,
    kind: str,
    ref_index: int,
    max_new: int,
    timeout_s: float,
    stop_after: int = 0,
    stop: Callable[[Any], Awaitable[None]] | None = None,
    stopped_status: str = "",
) -> Outcome:
    """One Generate stream to its end; with `stop_after`, `stop(call)` ends it after that many messages."""
    start = time.perf_counter()
    call = stub.Generate(generate_request(checker.refs[ref_index].prompt, max_new), timeout=timeout_s)
    out = Outcome(kind, "error", 0.0, max_new=max_new)
    ids: list[int] = []
    text: list[str] = []
    finish = 0
    try:
        async for message in call:
            out.messages += 1
            if message.token_ids and out.ttft_s is None:
                out.ttft_s = time.perf_counter() - start
            ids.extend(message.token_ids)
            text.append(message.text)
            finish = message.finish_reason or finish
            if stop is not None and out.messages >= stop_after and not finish:
                await stop(call)
                out.status = stopped_status
                break
        else:
            out.status = "completed"
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            out.status = "deadline_running" if ids else "deadline_waiting" if out.messages else "deadline_at_admission"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not out.messages:
            out.status = "rejected"
            trailers = dict(exc.trailing_metadata() or ())
            raw = trailers.get(RETRY_PUSHBACK_KEY)
            out.pushback_ms = int(raw) if raw is not None and str(raw).isdigit() else None
            out.retry_hint = "retry" in (exc.details() or "").lower()
        else:
            out.error = f"{code.name}: {exc.details()}"
    except Exception as exc:  # the script's own view of a failure it did not expect
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - start
    out.tokens = len(ids)
    complete = out.status == "completed"
    if complete and finish == 0:
        out.status, out.error = "error", "the stream ended without a finish reason"
    if out.status != "error":
        out.problem = checker.problem(ref_index, ids, "".join(text), max_new, complete)
    return out


# ---- crashed clients ----------------------------------------------------------------------------------------------


async def crash_client_main() -> None:
    """Child mode: open the streams on stdin's spec, wait until each has `after` messages, then os._exit."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    spec = json.loads(sys.stdin.read())
    channel = grpc.aio.insecure_channel(spec["address"])
    stub = pb_grpc.GenerationServiceStub(channel)
    received: list[list[int]] = [[] for _ in spec["streams"]]
    finished = [False] * len(spec["streams"])
    errors = [""] * len(spec["streams"])
    reached = asyncio.Semaphore(0)

    async def one(i: int, stream: dict[str, Any]) -> None:
        messages, released = 0, False
        try:
            call = stub.Generate(generate_request(stream["prompt"], stream["max_new"]), timeout=GENEROUS_TIMEOUT_S)
            async for message in call:
                messages += 1
                received[i].extend(message.token_ids)
                if messages == stream["after"]:
                    reached.release()
                    released = True
            finished[i] = True
        except grpc.aio.AioRpcError as exc:
            errors[i] = f"{exc.code().name}: {exc.details()}"
        finally:
            if not released:
                reached.release()

    tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(spec["streams"])]
    for _ in tasks:
        await reached.acquire()
    sys.stdout.write(json.dumps({"ids": received, "finished": finished, "errors": errors}) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no goodbye: the kernel closes the socket under the open streams


async def run_crash_client(address: str, checker: Checker, streams: list[tuple[int, int, int]]) -> list[Outcome]:
    """Run a child that opens `streams` ((prompt, max_new, after) each) and dies mid-stream."""
    spec = {
        "address": address,
        "streams": [{"prompt": checker.refs[r].prompt, "max_new": n, "after": k} for r, n, k in streams],
    }
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.soak", "--crash-client"),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), GENEROUS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        stdout, stderr = b"", b"timed out"
    latency = time.perf_counter() - start
    try:
        report = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        error = f"crash client failed (rc {proc.returncode}): {stderr.decode(errors='replace')[-500:]}"
        return [Outcome("crash", "error", latency, max_new=n, error=error) for _, n, _ in streams]
    outcomes = []
    for (r, n, _), ids, done, error in zip(streams, report["ids"], report["finished"], report["errors"], strict=True):
        if error:
            outcomes.append(Outcome("crash", "error", latency, tokens=len(ids), max_new=n, error=error))
            continue
        status = "completed" if done else "crashed"
        # A stream that finished first is checked on its token ids (the child does not keep text).
        problem = checker.problem(r, ids, "", n, complete=False)
        if done and not problem and len(ids) != n:
            problem = f"prompt {r}: {len(ids)} tokens, expected {n}"
        outcomes.append(Outcome("crash", status, latency, tokens=len(ids), max_new=n, problem=problem))
    return outcomes


# ---- the server of a scenario -------------------------------------------------------------------------------------


def health_view(h: Any) -> dict[str, Any]:
    return {
        "requests_running": h.requests_running,
        "requests_waiting": h.requests_waiting,
        "waiting_tokens": h.waiting_tokens,
        "kv_cache_tokens_used": h.kv_cache_tokens_used,
        "kv_cache_usage": round(h.kv_cache_usage, 4),
        "kv_cache_budget_tokens": h.kv_cache_budget_tokens,
        "max_batch_size": h.max_batch_size,
        "rss_mib": round(h.memory.process_rss_bytes / MIB, 1),
    }


@dataclass
class Session:
    """A scenario's server and clients: the load on grpc.aio channels, Health on a sync channel of its own
    (read from threads, so a wait never blocks the load's event loop). The last fields are filled when
    the server has stopped."""

    server: ServerProcess
    args: tuple[str, ...]
    stubs: list[Any]
    health_stub: Any
    checker: Checker
    before: Any  # Health before the load
    exit_code: int | None = None
    stop_s: float = 0.0
    log_errors: list[str] = field(default_factory=list)

    async def health(self) -> Any:
        from modelserve_client.v1 import generation_pb2 as pb

        return await asyncio.to_thread(self.health_stub.Health, pb.HealthRequest(), timeout=10)

    async def wait_idle(self, timeout_s: float) -> tuple[Any, float]:
        """The Health once idle (or at the timeout), and the seconds it took."""
        start, kv_idle = time.perf_counter(), self.before.kv_cache_tokens_used
        end = await asyncio.to_thread(wait_idle, self.health_stub, timeout_s, lambda h: is_idle(h, kv_idle))
        return end, time.perf_counter() - start

    def report(self, end: Any, idle_s: float) -> dict[str, Any]:
        """The figures of the leak checks and of the server's end, for the scenario's report."""
        return {
            "leaked_rows": end.requests_running + end.requests_waiting,
            "kv_tokens_before": self.before.kv_cache_tokens_used,
            "kv_tokens_after": end.kv_cache_tokens_used,
            "waiting_tokens_after": end.waiting_tokens,
            "idle_after_s": round(idle_s, 2),
            "server_args": list(self.args),
            "server_log_errors": len(self.log_errors),
            "server_log_errors_sample": self.log_errors[:10],
            "server_exit_code": self.exit_code,
            "server_stop_s": round(self.stop_s, 2),
        }


@contextlib.asynccontextmanager
async def serving(
    path: Path, log_dir: Path, name: str, prompts: list[str], max_new: int, channels: int, *args: str
) -> AsyncIterator[Session]:
    """A scenario's server, SERVING and with each prompt's reference computed; SIGTERM when the block ends."""
    from modelserve_client.v1 import generation_pb2 as pb
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from tokenizers import Tokenizer

    args = ("--model", str(path), "--device", "cpu", "--dtype", "float32", *args)
    server = start_server(log_dir, *args, name=name)
    aio_channels: list[grpc.aio.Channel] = []
    health_channel = server.channel()
    session = None
    try:
        server.wait_serving()  # blocks this loop, which has nothing else to do yet
        health_stub = pb_grpc.GenerationServiceStub(health_channel)
        before = health_stub.Health(pb.HealthRequest(), timeout=10)
        aio_channels = [grpc.aio.insecure_channel(server.address) for _ in range(channels)]
        stubs = [pb_grpc.GenerationServiceStub(c) for c in aio_channels]
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        t0 = time.perf_counter()
        checker = Checker(await compute_references(stubs[0], prompts, max_new, tokenizer), tokenizer)
        print(f"  {name}: {len(prompts)} references in {time.perf_counter() - t0:.1f}s", flush=True)
        session = Session(server, args, stubs, health_stub, checker, before)
        yield session
    finally:
        for c in aio_channels:
            await c.close(grace=None)
        health_channel.close()
        t0 = time.perf_counter()
        exit_code = server.terminate()
        if session is not None:
            session.exit_code, session.stop_s = exit_code, time.perf_counter() - t0
            session.log_errors = server.log_errors()


class Monitor:
    """Samples Health in a thread while the `with` block runs: the peaks and the RSS series for the report."""

    def __init__(self, session: Session, period_s: float) -> None:
        self._session, self._period = session, period_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from modelserve_client.v1 import generation_pb2 as pb

        t0 = time.perf_counter()
        while not self._stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                h = self._session.health_stub.Health(pb.HealthRequest(), timeout=10)
                self.samples.append({"t_s": round(time.perf_counter() - t0, 2), **health_view(h)})
            self._stop.wait(self._period)

    def peak(self, key: str) -> Any:
        return max((s[key] for s in self.samples), default=0)


# ---- the load -----------------------------------------------------------------------------------------------------


@dataclass
class Planned:
    kind: str
    ref: int
    max_new: int
    stop_after: int = 0
    timeout_s: float = GENEROUS_TIMEOUT_S
    deadline_fraction: float = 0.0  # deadline_running: a share of the recent full-length latency
    crash: list[tuple[int, int, int]] = field(default_factory=list)


def plan(cfg: SoakConfig, n: int, rng: random.Random) -> list[Planned]:
    """`n` streams of the mix; every `crash_every` streams, a crashed client (counted as its streams)."""
    kinds, weights = list(MIX), list(MIX.values())
    items: list[Planned] = []
    streams = crashes = 0
    while streams < n:
        if cfg.crash_every and streams >= (crashes + 1) * cfg.crash_every:
            k = min(cfg.crash_streams, n - streams)
            crash = [(rng.randrange(cfg.prompts), cfg.max_new, rng.randint(2, 6)) for _ in range(k)]
            items.append(Planned("crash", 0, cfg.max_new, crash=crash))
            streams, crashes = streams + k, crashes + 1
            continue
        kind = rng.choices(kinds, weights)[0]
        ref = rng.randrange(cfg.prompts)
        if kind == "normal":
            items.append(Planned(kind, ref, rng.randint(1, cfg.max_new)))
        elif kind in ("cancel", "disconnect"):
            # Message 1 is the header (sent before the request has a row); later ones carry tokens.
            items.append(Planned(kind, ref, rng.randint(cfg.max_new // 2, cfg.max_new), stop_after=rng.randint(1, 8)))
        elif kind == "deadline_short":
            # 5-300 ms, log-uniform: refused at admission, or expired while waiting for a row.
            timeout = math.exp(rng.uniform(math.log(0.005), math.log(0.3)))
            items.append(Planned(kind, ref, cfg.max_new, timeout_s=timeout))
        else:  # deadline_running
            # Most of a request's time at this concurrency is spent waiting for a row, so a deadline that
            # expires while it generates is most of its usual latency; a few are long enough to complete.
            items.append(Planned(kind, ref, cfg.max_new, deadline_fraction=rng.uniform(0.65, 1.05)))
        streams += 1
    return items


class FullLatency:
    """The recent latency of near-full-length normal requests under this load (for deadline_running)."""

    def __init__(self, prior_s: float, max_new: int) -> None:
        self._recent: collections.deque[float] = collections.deque([prior_s], maxlen=64)
        self._max_new = max_new

    def saw(self, outcome: Outcome) -> None:
        if outcome.kind == "normal" and outcome.status == "completed" and outcome.max_new >= 0.75 * self._max_new:
            self._recent.append(outcome.latency_s)

    def now(self) -> float:
        return statistics.median(self._recent)


async def drive(
    s: Session,
    items: list[Planned],
    concurrency: int,
    full: FullLatency | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Run the planned items, `concurrency` at a time (a crashed client takes one slot)."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    todo = collections.deque(items)
    outcomes: list[Outcome] = []

    async def cancel(call: Any) -> None:
        call.cancel()

    async def one(stub: Any, item: Planned) -> Outcome:
        timeout = item.timeout_s
        if item.kind == "deadline_running" and full is not None:
            timeout = item.deadline_fraction * full.now()
        planned = (item.kind, item.ref, item.max_new, timeout, item.stop_after)
        if item.kind != "disconnect":
            return await run_stream(stub, s.checker, *planned, cancel if item.kind == "cancel" else None, "cancelled")
        channel = grpc.aio.insecure_channel(s.server.address)  # its own: closing it ends this stream only

        async def close(call: Any) -> None:
            await channel.close(grace=None)

        try:
            return await run_stream(pb_grpc.GenerationServiceStub(channel), s.checker, *planned, close, "disconnected")
        finally:
            await channel.close(grace=None)

    async def worker(w: int) -> None:
        stub = s.stubs[w % len(s.stubs)]
        while todo:
            item = todo.popleft()
            if item.kind == "crash":
                results = await run_crash_client(s.server.address, s.checker, item.crash)
            else:
                results = [await one(stub, item)]
            for r in results:
                if full is not None:
                    full.saw(r)
                outcomes.append(r)
            if on_done is not None:
                on_done(len(outcomes))

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return outcomes


def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = collections.Counter(o.status for o in outcomes)
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, {}).setdefault(o.status, 0)
        by_kind[o.kind][o.status] += 1
    return {
        "requests": len(outcomes),
        **{s: counts.get(s, 0) for s in STATUSES},
        "deadline_exceeded": sum(counts.get(s, 0) for s in STATUSES if s.startswith("deadline")),
        "wrong_outputs": sum(1 for o in outcomes if o.problem),
        "output_tokens": sum(o.tokens for o in outcomes),
        "by_kind": by_kind,
        "errors_sample": sorted({o.error for o in outcomes if o.error})[:10],
        "wrong_sample": [o.problem for o in outcomes if o.problem][:10],
    }


def check(checks: dict[str, dict[str, Any]], name: str, ok: bool, detail: str) -> None:
    """Record a pass condition (all are required: one that fails fails the run)."""
    checks[name] = {"ok": bool(ok), "detail": detail}


def leak_checks(checks: dict[str, dict[str, Any]], report: dict[str, Any]) -> None:
    leaked, before, after = report["leaked_rows"], report["kv_tokens_before"], report["kv_tokens_after"]
    check(checks, "no leaked rows", leaked == 0, f"running+waiting after idle = {leaked} ({report['idle_after_s']}s)")
    check(checks, "KV back to idle", after == before, f"{after} vs {before} before")
    waiting = report["waiting_tokens_after"]
    check(checks, "no queued tokens counted", waiting == 0, f"waiting_tokens = {waiting}")


def server_checks(checks: dict[str, dict[str, Any]], s: Session) -> None:
    """The server's log reports no error (see bench.harness.log_errors), and it exits with 0 on SIGTERM."""
    first = f"; first: {s.log_errors[0][:200]}" if s.log_errors else ""
    check(checks, "no ERROR lines in the server log", not s.log_errors, f"{len(s.log_errors)} lines{first}")
    check(checks, "server exits cleanly on SIGTERM", s.exit_code == 0, f"exit code {s.exit_code} after {s.stop_s:.1f}s")


def ms(values: list[float], q: float, digits: int = 2) -> float | None:
    return round(1e3 * pct(values, q), digits) if values else None


# ---- the scenarios ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return int(2 * config["num_hidden_layers"] * kv_heads * head_dim * 4)  # K and V, float32


async def soak_scenario(path: Path, cfg: SoakConfig, log_dir: Path) -> dict[str, Any]:
    """The soak against its own server; returns the report (report['checks'][name]['ok'] all True = pass)."""
    from tokenizers import Tokenizer

    rng = random.Random(cfg.seed)
    prompts = make_prompts(Tokenizer.from_file(str(path / "tokenizer.json")), cfg.prompts, cfg.long_prompt_share, rng)
    args = (
        *("--max-batch-size", str(cfg.max_batch_size)),
        *("--kv-cache-bytes", str(cfg.kv_tokens * kv_bytes_per_token(path))),
        # The soak is about churn, not refusals: the queue holds every client (overload tests refusals).
        *("--max-waiting-requests", str(max(256, 2 * cfg.concurrency))),
        *("--max-waiting-tokens", str(4 * cfg.concurrency * (400 + cfg.max_new))),
        *("--grace-s", "10"),
    )
    async with serving(path, log_dir, "soak-server", prompts, cfg.max_new, cfg.channels, *args) as s:
        full_lone = statistics.median(r.lone_s for r in s.checker.refs)
        full = FullLatency(4 * full_lone * cfg.concurrency / cfg.max_batch_size, cfg.max_new)
        with Monitor(s, 1.0) as monitor:
            warm_items, items = plan(cfg, cfg.warmup, rng), plan(cfg, cfg.requests, rng)
            t0 = time.perf_counter()
            warm = await drive(s, warm_items, cfg.concurrency, full)
            after_warm, _ = await s.wait_idle(cfg.idle_timeout_s)
            rss_base = after_warm.memory.process_rss_bytes
            print(f"  soak: warm-up of {len(warm)} streams in {time.perf_counter() - t0:.1f}s", flush=True)

            half: list[asyncio.Future[Any]] = []

            def on_done(done: int) -> None:
                if done >= len(items) // 2 and not half:
                    half.append(asyncio.ensure_future(s.health()))

            t0 = time.perf_counter()
            outcomes = await drive(s, items, cfg.concurrency, full, on_done)
            wall = time.perf_counter() - t0
            print(f"  soak: {len(outcomes)} streams in {wall:.1f}s", flush=True)
            end, idle_s = await s.wait_idle(cfg.idle_timeout_s)
        rss_half = (await half[0]).memory.process_rss_bytes if half else None

        # The server still answers every prompt correctly after the soak.
        n_refs = len(s.checker.refs)
        probe = [
            await run_stream(s.stubs[0], s.checker, "probe", i, cfg.max_new, GENEROUS_TIMEOUT_S) for i in range(n_refs)
        ]
        probe_ok = sum(1 for o in probe if o.status == "completed" and not o.problem)

    counts, warm_counts = tally(outcomes), tally(warm)
    rss_end = end.memory.process_rss_bytes
    growth = rss_end - rss_base
    bound = max(cfg.rss_bound_mib * MIB, cfg.rss_bound_frac * rss_base)
    normal_lat = [o.latency_s for o in outcomes if o.kind == "normal" and o.status == "completed"]
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "wall_s": round(wall, 1),
        "streams_per_s": round(len(outcomes) / wall, 1),
        "output_tokens_per_s": round(counts["output_tokens"] / wall, 1),
        "normal_latency_p50_ms": ms(normal_lat, 0.5, 1),
        "normal_latency_p99_ms": ms(normal_lat, 0.99, 1),
        **counts,
        "warmup": {k: warm_counts[k] for k in ("requests", "completed", "error", "wrong_outputs")},
        "peak_running": monitor.peak("requests_running"),
        "peak_waiting": monitor.peak("requests_waiting"),
        "peak_kv_cache_usage": monitor.peak("kv_cache_usage"),
        "health_before": health_view(s.before),
        "health_after_idle": health_view(end),
        **s.report(end, idle_s),
        "rss_after_warmup_mib": round(rss_base / MIB, 1),
        "rss_half_mib": round(rss_half / MIB, 1) if rss_half is not None else None,
        "rss_end_mib": round(rss_end / MIB, 1),
        "rss_growth_mib": round(growth / MIB, 1),
        "rss_growth_pct": round(100 * growth / rss_base, 2),
        "rss_growth_per_1k_streams_kib": round(growth / 1024 / (len(outcomes) / 1000), 1),
        "rss_bound_mib": round(bound / MIB, 1),
        "post_probe_correct": f"{probe_ok}/{len(probe)}",
        "rss_series": [(sample["t_s"], sample["rss_mib"]) for sample in monitor.samples],
    }
    checks: dict[str, dict[str, Any]] = {}
    budget = s.before.kv_cache_budget_tokens
    check(checks, "health reports the KV budget", budget > 0, "kv_cache_budget_tokens > 0")
    errors, wrong = counts["error"] + warm_counts["error"], counts["wrong_outputs"] + warm_counts["wrong_outputs"]
    check(checks, "no other errors", errors == 0, f"{counts['error']} (+{warm_counts['error']} in warm-up)")
    check(
        checks,
        "no wrong outputs",
        wrong == 0,
        f"{counts['wrong_outputs']} (+{warm_counts['wrong_outputs']} in warm-up)",
    )
    normal = counts["by_kind"].get("normal", {})
    done, n_normal = normal.get("completed", 0), sum(normal.values())
    check(checks, "every normal request completed", done == n_normal, f"{done}/{n_normal}")
    leak_checks(checks, report)
    growth_detail = f"{growth / MIB:+.1f} MiB ({100 * growth / rss_base:+.1f}%) <= {bound / MIB:.0f} MiB"
    check(checks, "RSS growth within bound", growth <= bound, growth_detail)
    check(checks, "server answers correctly after", probe_ok == len(probe), report["post_probe_correct"])
    server_checks(checks, s)
    report["checks"] = checks
    return report


async def overload_scenario(path: Path, cfg: OverloadConfig, log_dir: Path) -> dict[str, Any]:
    """Capacity, then `factor` x capacity offered against a small waiting queue; returns the report."""
    from tokenizers import Tokenizer

    rng = random.Random(cfg.seed)
    prompts = make_prompts(Tokenizer.from_file(str(path / "tokenizer.json")), cfg.prompts, 0.0, rng)
    args = ("--max-batch-size", str(cfg.max_batch_size), "--max-waiting-requests", str(cfg.max_waiting_requests))
    async with serving(path, log_dir, "overload-server", prompts, cfg.new_tokens, 4, *args, "--grace-s", "10") as s:
        # Capacity: closed loop, one client per batch row.
        items = [Planned("capacity", rng.randrange(len(prompts)), cfg.new_tokens) for _ in range(cfg.capacity_requests)]
        t0 = time.perf_counter()
        capacity = await drive(s, items, cfg.max_batch_size)
        cap_wall = time.perf_counter() - t0
        cap_rate = len(capacity) / cap_wall
        await s.wait_idle(cfg.idle_timeout_s)
        print(f"  overload: capacity {cap_rate:.1f} req/s at C={cfg.max_batch_size}", flush=True)

        # Overload: open loop, Poisson arrivals at factor x capacity.
        rate = cfg.factor * cap_rate
        tasks: list[asyncio.Task[Outcome]] = []
        with Monitor(s, 0.5) as monitor:
            t0 = time.perf_counter()
            next_at = 0.0
            while next_at < cfg.overload_s:
                delay = t0 + next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival process itself
                stub, r = s.stubs[len(tasks) % len(s.stubs)], rng.randrange(len(prompts))
                stream = run_stream(stub, s.checker, "overload", r, cfg.new_tokens, GENEROUS_TIMEOUT_S)
                tasks.append(asyncio.ensure_future(stream))
                next_at += rng.expovariate(rate)
            offered_s = time.perf_counter() - t0
            overload = list(await asyncio.gather(*tasks))
            over_wall = time.perf_counter() - t0
        end, idle_s = await s.wait_idle(cfg.idle_timeout_s)

        # The waiting queue's count came back to zero: max_waiting_requests requests at once all get in.
        probe = await asyncio.gather(
            *(
                run_stream(
                    s.stubs[j % len(s.stubs)], s.checker, "probe", j % len(prompts), cfg.new_tokens, GENEROUS_TIMEOUT_S
                )
                for j in range(cfg.max_waiting_requests)
            )
        )
        probe_ok = sum(1 for o in probe if o.status == "completed" and not o.problem)
        end2, _ = await s.wait_idle(cfg.idle_timeout_s)

    admitted = [o for o in overload if o.status != "rejected"]
    rejected = [o for o in overload if o.status == "rejected"]
    completed = [o for o in admitted if o.status == "completed" and not o.problem]
    cap_ok = [o for o in capacity if o.status == "completed" and not o.problem]
    cap_lat = [o.latency_s for o in cap_ok]
    adm_lat = [o.latency_s for o in completed]
    rej_lat = [o.latency_s for o in rejected]
    pushbacks = [o.pushback_ms for o in rejected if o.pushback_ms is not None]
    both = bool(adm_lat and cap_lat)
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "capacity": {
            "requests": len(capacity),
            "completed_correct": len(cap_ok),
            "req_per_s": round(cap_rate, 2),
            "tok_per_s": round(sum(o.tokens for o in capacity) / cap_wall, 1),
            "latency_p50_ms": ms(cap_lat, 0.5),
            "latency_p99_ms": ms(cap_lat, 0.99),
            "ttft_p50_ms": ms([o.ttft_s for o in cap_ok if o.ttft_s is not None], 0.5),
        },
        "offered": len(overload),
        "offered_rate_target": round(rate, 1),
        "offered_rate": round(len(overload) / offered_s, 1),
        "admitted": len(admitted),
        "admitted_completed_correct": len(completed),
        "rejected": len(rejected),
        "rejected_pct": round(100 * len(rejected) / max(1, len(overload)), 1),
        "rejection_latency_p50_ms": ms(rej_lat, 0.5),
        "rejection_latency_p99_ms": ms(rej_lat, 0.99),
        "rejection_latency_max_ms": ms(rej_lat, 1.0),
        "rejections_with_pushback": len(pushbacks),
        "pushback_ms_min": min(pushbacks, default=None),
        "pushback_ms_max": max(pushbacks, default=None),
        "rejections_with_retry_hint": sum(1 for o in rejected if o.retry_hint),
        "admitted_latency_p50_ms": ms(adm_lat, 0.5),
        "admitted_latency_p99_ms": ms(adm_lat, 0.99),
        "admitted_ttft_p50_ms": ms([o.ttft_s for o in completed if o.ttft_s is not None], 0.5),
        "admitted_p50_over_capacity_p50": round(pct(adm_lat, 0.5) / pct(cap_lat, 0.5), 2) if both else None,
        "admitted_p99_over_capacity_p99": round(pct(adm_lat, 0.99) / pct(cap_lat, 0.99), 2) if both else None,
        "goodput_tok_per_s": round(sum(o.tokens for o in completed) / over_wall, 1),
        "peak_running": monitor.peak("requests_running"),
        "peak_waiting": monitor.peak("requests_waiting"),
        "other_errors": sum(1 for o in overload + capacity if o.status == "error"),
        "errors_sample": sorted({o.error for o in overload + capacity if o.error})[:10],
        "wrong_outputs": sum(1 for o in overload + capacity if o.problem),
        "wrong_sample": [o.problem for o in overload + capacity if o.problem][:10],
        "by_status": dict(collections.Counter(o.status for o in overload)),
        **s.report(end, idle_s),
        "queue_probe_admitted": f"{probe_ok}/{len(probe)}",
        "health_after_probe": health_view(end2),
    }
    checks: dict[str, dict[str, Any]] = {}
    check(checks, "capacity run all correct", len(cap_ok) == len(capacity), f"{len(cap_ok)}/{len(capacity)}")
    check(checks, "overload reached (some rejected)", bool(rejected), f"{len(rejected)} of {len(overload)} rejected")
    ok = len(completed) == len(admitted)
    check(checks, "every admitted request completed correctly", ok, f"{len(completed)}/{len(admitted)}")
    check(checks, "no other errors", report["other_errors"] == 0, str(report["other_errors"]))
    ok = len(pushbacks) == len(rejected)
    check(checks, "every rejection carries grpc-retry-pushback-ms", ok, f"{len(pushbacks)}/{len(rejected)}")
    check(
        checks,
        "rejections are fast (p99 below the admitted p50)",
        bool(rej_lat and adm_lat) and pct(rej_lat, 0.99) < pct(adm_lat, 0.5),
        f"rejection p99 {report['rejection_latency_p99_ms']} ms vs admitted p50 {report['admitted_latency_p50_ms']} ms",
    )
    leak_checks(checks, report)
    check(checks, "queue takes max_waiting_requests again", probe_ok == len(probe), report["queue_probe_admitted"])
    server_checks(checks, s)
    report["checks"] = checks
    return report


# ---- report -------------------------------------------------------------------------------------------------------


def failed(report: dict[str, Any]) -> list[str]:
    return [
        f"{scenario}: {name} ({c['detail']})"
        for scenario in ("soak", "overload")
        for name, c in report.get(scenario, {}).get("checks", {}).items()
        if not c["ok"]
    ]


def markdown(report: dict[str, Any]) -> str:
    lines = header(report["title"], report)
    s = report.get("soak")
    if s:
        c = s["config"]
        lines += [
            f"**Soak**: {s['requests']} streams (+{s['warmup']['requests']} warm-up) "
            f"at concurrency {c['concurrency']}, "
            f"max_batch_size {c['max_batch_size']}, KV budget {c['kv_tokens']} tokens, {c['prompts']} prompts, "
            f"max_new_tokens 1-{c['max_new']}; {s['wall_s']} s, {s['streams_per_s']} streams/s, "
            f"{s['output_tokens_per_s']} output tok/s.",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| requests | {s['requests']} |",
            f"| completed (checked against the lone reference) | {s['completed']} |",
            f"| cancelled by the client | {s['cancelled']} |",
            f"| disconnected (channel closed) | {s['disconnected']} |",
            f"| crashed client (process exited) | {s['crashed']} |",
            f"| deadline exceeded: at admission / waiting / running | {s['deadline_at_admission']} / "
            f"{s['deadline_waiting']} / {s['deadline_running']} |",
            f"| rejected (RESOURCE_EXHAUSTED) | {s['rejected']} |",
            f"| other errors | **{s['error']}** |",
            f"| wrong outputs | **{s['wrong_outputs']}** |",
            f"| leaked rows (running + waiting after idle) | **{s['leaked_rows']}** "
            f"(idle after {s['idle_after_s']} s) |",
            f"| KV tokens used: before / after | {s['kv_tokens_before']} / {s['kv_tokens_after']} |",
            f"| queued tokens after | {s['waiting_tokens_after']} |",
            f"| peak running / waiting / KV usage | {s['peak_running']} / {s['peak_waiting']} / "
            f"{s['peak_kv_cache_usage']:.0%} |",
            f"| RSS after warm-up / half-way / end | {s['rss_after_warmup_mib']} / {s['rss_half_mib']} / "
            f"{s['rss_end_mib']} MiB |",
            f"| RSS growth (bound) | {s['rss_growth_mib']:+} MiB, {s['rss_growth_pct']:+}% "
            f"({s['rss_growth_per_1k_streams_kib']} KiB per 1k streams; bound {s['rss_bound_mib']} MiB) |",
            f"| normal request latency p50 / p99 | {s['normal_latency_p50_ms']} / {s['normal_latency_p99_ms']} ms |",
            f"| after the soak: lone requests correct | {s['post_probe_correct']} |",
            f"| server log errors; exit code on SIGTERM | {s['server_log_errors']}; {s['server_exit_code']} |",
            "",
        ]
    o = report.get("overload")
    if o:
        cap = o["capacity"]
        c = o["config"]
        lines += [
            f"**Overload**: max_batch_size {c['max_batch_size']}, --max-waiting-requests {c['max_waiting_requests']}, "
            f"{c['new_tokens']} new tokens a request; capacity = closed loop at C={c['max_batch_size']} "
            f"({cap['requests']} requests); overload = Poisson arrivals at {c['factor']:g}x the capacity's "
            f"request rate for {c['overload_s']:g} s.",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| capacity: throughput | {cap['req_per_s']} req/s, {cap['tok_per_s']} tok/s |",
            f"| capacity: latency p50 / p99 | {cap['latency_p50_ms']} / {cap['latency_p99_ms']} ms |",
            f"| offered (rate achieved / target) | {o['offered']} "
            f"({o['offered_rate']} / {o['offered_rate_target']} req/s) |",
            f"| admitted / completed correctly | {o['admitted']} / {o['admitted_completed_correct']} |",
            f"| rejected (RESOURCE_EXHAUSTED) | {o['rejected']} ({o['rejected_pct']}%) |",
            f"| rejection latency p50 / p99 / max | {o['rejection_latency_p50_ms']} / "
            f"{o['rejection_latency_p99_ms']} / {o['rejection_latency_max_ms']} ms |",
            f"| rejections with grpc-retry-pushback-ms (range) | {o['rejections_with_pushback']}/{o['rejected']} "
            f"({o['pushback_ms_min']}-{o['pushback_ms_max']} ms) |",
            f"| admitted latency p50 / p99 | {o['admitted_latency_p50_ms']} / {o['admitted_latency_p99_ms']} ms |",
            f"| admitted p50 / capacity p50 (p99 / p99) | **{o['admitted_p50_over_capacity_p50']}** "
            f"({o['admitted_p99_over_capacity_p99']}) |",
            f"| time to first token p50: capacity / admitted | {cap['ttft_p50_ms']} / {o['admitted_ttft_p50_ms']} ms |",
            f"| goodput under overload vs capacity | {o['goodput_tok_per_s']} vs {cap['tok_per_s']} tok/s |",
            f"| peak running / waiting | {o['peak_running']} / {o['peak_waiting']} |",
            f"| other errors; wrong outputs | **{o['other_errors']}**; **{o['wrong_outputs']}** |",
            f"| leaked rows; KV before / after; queued tokens after | **{o['leaked_rows']}**; "
            f"{o['kv_tokens_before']} / {o['kv_tokens_after']}; {o['waiting_tokens_after']} |",
            f"| queue probe ({c['max_waiting_requests']} at once after idle) | {o['queue_probe_admitted']} admitted |",
            "",
        ]
    lines += ["Pass conditions:", ""]
    for scenario in ("soak", "overload"):
        for name, c in report.get(scenario, {}).get("checks", {}).items():
            lines.append(f"- {scenario}: {name}: {'pass' if c['ok'] else '**FAIL**'} ({c['detail']})")
    return "\n".join(lines) + "\n"


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    path = model_dir(MODEL, ns.cache_dir)
    soak_cfg = QUICK_SOAK if ns.quick else SoakConfig()
    over_cfg = QUICK_OVERLOAD if ns.quick else OverloadConfig()
    if ns.requests:
        soak_cfg = dataclasses.replace(soak_cfg, requests=ns.requests)
    if ns.concurrency:
        soak_cfg = dataclasses.replace(soak_cfg, concurrency=ns.concurrency)
    if ns.overload_s:
        over_cfg = dataclasses.replace(over_cfg, overload_s=ns.overload_s)
    report: dict[str, Any] = {
        "title": f"Soak and overload: tiny llama on CPU{' (quick)' if ns.quick else ''}",
        **run_info("cpu", "bench.soak"),
    }
    if ns.scenario in ("soak", "both"):
        report["soak"] = await soak_scenario(path, soak_cfg, ns.log_dir)
    if ns.scenario in ("overload", "both"):
        report["overload"] = await overload_scenario(path, over_cfg, ns.log_dir)
    return report


def main() -> None:
    if sys.argv[1:] == ["--crash-client"]:
        asyncio.run(crash_client_main())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred streams, about a minute")
    parser.add_argument("--scenario", choices=("soak", "overload", "both"), default="both")
    parser.add_argument("--requests", type=int, default=None, help="soak streams in the measured phase")
    parser.add_argument("--concurrency", type=int, default=None, help="soak streams at once")
    parser.add_argument("--overload-s", type=float, default=None, help="seconds of overload")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/reliability.md")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--log-dir", type=Path, default=RESULTS, help="where the servers' logs go")
    ns = parser.parse_args()
    report = asyncio.run(run(ns))
    table = markdown(report)
    save("soak", report, table)
    if ns.write_docs:
        write_docs("reliability.md", "soak", table)
    problems = failed(report)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("all pass conditions met")


if __name__ == "__main__":
    main()
