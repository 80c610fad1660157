"""Soak and overload: does modelserve stay correct, leak-free and responsive under abuse?

Each scenario starts a `modelserve serve` of its own (bench.harness) on the tests' tiny seeded Llama and
drives it with grpc.aio clients from this process. SOAK: thousands of streams of a seeded mix of normal
requests, cancels, deadlines, disconnects and crashed clients, every output checked against a lone
reference. OVERLOAD: the capacity, then Poisson arrivals at 10x it against a small waiting queue. Both
then check for leaks, the server's log and its exit; docs/reliability.md has the details.

Writes bench/results/soak-<time>.{json,md} (the servers' logs beside them), with --write-docs the table
into docs/reliability.md, and exits 1 when a pass condition fails. tests/test_soak.py runs both small.

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
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import harness

MODEL = "tiny-llama"  # the tests' model: 2 layers, 64 wide, a 1,024-token vocabulary, seed 7
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
GENEROUS_TIMEOUT_S = 120.0  # for requests that are meant to complete
MIB = 1 << 20

# The mix of the soak (weights); crashed clients come on top, one every `crash_every` requests.
MIX = {"normal": 0.55, "cancel": 0.12, "deadline_short": 0.08, "deadline_running": 0.12, "disconnect": 0.13}
# The kinds that end their stream early, and how that stream ends.
STOPPED = {"cancel": "cancelled", "disconnect": "disconnected"}
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
    # RSS may grow by at most max(32 MiB, 5%) from after the warm-up to the end: a leak-free server is
    # flat by then (under 1 MiB over thousands of streams), and 4 KiB a stream over 8,000 streams is 32 MiB.
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


QUICK_OVERLOAD = OverloadConfig(capacity_requests=24, new_tokens=128, overload_s=5.0, prompts=8)


# ---- one stream ---------------------------------------------------------------------------------------------------


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
    tokens: int = 0
    max_new: int = 0
    ttft_s: float | None = None
    problem: str = ""  # what was wrong with the output (empty: correct or nothing to check)
    error: str = ""  # the status and message of an unexpected failure
    pushback_ms: int | None = None
    retry_hint: bool = False


def correct(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status == "completed" and not o.problem]


def make_prompts(path: Path, n: int, long_share: float, rng: random.Random) -> list[str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool = harness.clean_token_ids(tokenizer)
    prompts = []
    for i in range(n):
        length = rng.randint(128, 400) if i < round(n * long_share) else rng.randint(4, 48)
        prompts.append(tokenizer.decode(harness.make_prompt(tokenizer, pool, length, rng)))
    return prompts


async def run_stream(
    s: Session,
    stub: Any,
    kind: str,
    ref: int,
    max_new: int,
    timeout_s: float = GENEROUS_TIMEOUT_S,
    stop_after: int = 0,
    channel: grpc.aio.Channel | None = None,
) -> Outcome:
    """One Generate stream to its end. The kinds in STOPPED end it after `stop_after` messages: a cancel
    calls call.cancel(), a disconnect closes `channel`, the stream's own."""
    start = time.perf_counter()
    call = stub.Generate(harness.generate_request(s.refs[ref].prompt, max_new), timeout=timeout_s)
    out = Outcome(kind, "error", 0.0, max_new=max_new)
    ids: list[int] = []
    text: list[str] = []
    messages = finish = 0
    try:
        async for message in call:
            messages += 1
            if message.token_ids and out.ttft_s is None:
                out.ttft_s = time.perf_counter() - start
            ids.extend(message.token_ids)
            text.append(message.text)
            finish = message.finish_reason or finish
            if kind in STOPPED and messages >= stop_after and not finish:
                if channel is None:
                    call.cancel()
                else:
                    await channel.close(grace=None)
                out.status = STOPPED[kind]
                break
        else:
            out.status = "completed"
            if not finish:
                out.status, out.error = "error", "the stream ended without a finish reason"
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            out.status = "deadline_running" if ids else "deadline_waiting" if messages else "deadline_at_admission"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not messages:
            out.status = "rejected"
            raw = dict(exc.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
            out.pushback_ms = int(raw) if raw is not None and str(raw).isdigit() else None
            out.retry_hint = "retry" in (exc.details() or "").lower()
        else:
            out.error = f"{code.name}: {exc.details()}"
    except Exception as exc:  # the script's own view of a failure it did not expect
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - start
    out.tokens = len(ids)
    if out.status != "error":
        out.problem = s.problem(ref, ids, "".join(text), max_new, out.status == "completed")
    return out


# ---- crashed clients ----------------------------------------------------------------------------------------------


async def crash_client_main() -> None:
    """Child mode: open the streams on stdin's spec, wait until each has `after` messages, then os._exit."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    spec = json.loads(sys.stdin.read())
    stub = pb_grpc.GenerationServiceStub(grpc.aio.insecure_channel(spec["address"]))
    n = len(spec["streams"])
    report: dict[str, list[Any]] = {"ids": [[] for _ in range(n)], "finished": [False] * n, "errors": [""] * n}
    reached = asyncio.Semaphore(0)

    async def one(i: int, stream: dict[str, Any]) -> None:
        messages, released = 0, False
        try:
            call = stub.Generate(
                harness.generate_request(stream["prompt"], stream["max_new"]), timeout=GENEROUS_TIMEOUT_S
            )
            async for message in call:
                messages += 1
                report["ids"][i].extend(message.token_ids)
                if messages == stream["after"]:
                    reached.release()
                    released = True
            report["finished"][i] = True
        except grpc.aio.AioRpcError as exc:
            report["errors"][i] = f"{exc.code().name}: {exc.details()}"
        finally:
            if not released:
                reached.release()

    tasks = [asyncio.ensure_future(one(i, stream)) for i, stream in enumerate(spec["streams"])]
    for _ in tasks:
        await reached.acquire()
    print(json.dumps(report), flush=True)
    os._exit(0)  # no goodbye: the kernel closes the socket under the open streams


async def run_crash_client(s: Session, streams: list[tuple[int, int, int]]) -> list[Outcome]:
    """Run a child that opens `streams` ((prompt, max_new, after) each) and dies mid-stream."""
    spec = {
        "address": s.server.address,
        "streams": [{"prompt": s.refs[r].prompt, "max_new": n, "after": k} for r, n, k in streams],
    }
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.soak", "--crash-client"),
        cwd=harness.ROOT,
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
        out = Outcome("crash", "completed" if done else "crashed", latency, tokens=len(ids), max_new=n)
        if error:
            out.status, out.error = "error", error
        else:
            # Checked on token ids only (the child keeps no text); one that finished must be full length.
            out.problem = s.problem(r, ids, "", n, complete=False)
            if done and not out.problem and len(ids) != n:
                out.problem = f"prompt {r}: {len(ids)} tokens, expected {n}"
        outcomes.append(out)
    return outcomes


# ---- the server of a scenario -------------------------------------------------------------------------------------


def health(stub: Any) -> Any:
    from modelserve_client.v1 import generation_pb2 as pb

    return stub.Health(pb.HealthRequest(), timeout=10)


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
    (called from threads, so a wait never blocks the load's event loop), each prompt's reference, and,
    once the server has stopped, how it ended."""

    server: harness.ServerProcess
    args: tuple[str, ...]
    stubs: list[Any]
    health_stub: Any
    tokenizer: Any
    refs: list[Reference]
    before: Any  # Health before the load
    exit_code: int | None = None
    stop_s: float = 0.0
    log_errors: list[str] = field(default_factory=list)

    async def wait_idle(self) -> tuple[Any, float]:
        """The Health once idle (or at harness.IDLE_TIMEOUT_S), and the seconds it took."""
        start, kv_idle = time.perf_counter(), self.before.kv_cache_tokens_used
        until = functools.partial(harness.is_idle, kv_tokens_idle=kv_idle)
        end = await asyncio.to_thread(harness.wait_idle, self.health_stub, harness.IDLE_TIMEOUT_S, until)
        return end, time.perf_counter() - start

    def problem(self, ref_index: int, ids: list[int], text: str, max_new: int, complete: bool) -> str:
        """What is wrong with a greedy output: it must be a prefix of the reference, all of it when complete."""
        ref = self.refs[ref_index]
        if ids != ref.ids[: len(ids)]:
            at = next(i for i, (a, b) in enumerate(zip(ids, ref.ids, strict=False)) if a != b) if ids else 0
            return f"prompt {ref_index}: token ids differ from the reference at position {at}"
        if not complete:
            return ""
        if len(ids) != max_new:
            return f"prompt {ref_index}: {len(ids)} tokens, expected {max_new}"
        want = ref.text if max_new == len(ref.ids) else self.tokenizer.decode(ids, skip_special_tokens=True)
        if text != want:
            return f"prompt {ref_index}: text {text[-40:]!r} differs from {want[-40:]!r} (n={max_new})"
        return ""

    def end_figures(self, end: Any, idle_s: float) -> dict[str, Any]:
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


async def compute_references(stub: Any, prompts: list[str], max_new: int) -> list[Reference]:
    """Each prompt's greedy output, from a lone request on an idle server."""
    refs = []
    for prompt in prompts:
        start = time.perf_counter()
        ids: list[int] = []
        text: list[str] = []
        async for message in stub.Generate(harness.generate_request(prompt, max_new), timeout=GENEROUS_TIMEOUT_S):
            ids.extend(message.token_ids)
            text.append(message.text)
        if len(ids) != max_new:
            raise RuntimeError(f"a lone reference request gave {len(ids)} tokens, not {max_new}")
        refs.append(Reference(prompt, ids, "".join(text), time.perf_counter() - start))
    return refs


@contextlib.asynccontextmanager
async def serving(
    path: Path, log_dir: Path, name: str, prompts: list[str], max_new: int, channels: int, *args: str
) -> AsyncIterator[Session]:
    """A scenario's server, SERVING and with each prompt's reference computed; SIGTERM when the block ends."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from tokenizers import Tokenizer

    args = ("--model", str(path), "--device", "cpu", "--dtype", "float32", *args, "--grace-s", "10")
    server = harness.start_server(log_dir, *args, name=name)
    aio_channels: list[grpc.aio.Channel] = []
    health_channel = server.channel()
    session = None
    try:
        server.wait_serving()  # blocks this loop, which has nothing else to do yet
        health_stub = pb_grpc.GenerationServiceStub(health_channel)
        before = health(health_stub)
        aio_channels = [grpc.aio.insecure_channel(server.address) for _ in range(channels)]
        stubs = [pb_grpc.GenerationServiceStub(c) for c in aio_channels]
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        t0 = time.perf_counter()
        refs = await compute_references(stubs[0], prompts, max_new)
        print(f"  {name}: {len(prompts)} references in {time.perf_counter() - t0:.1f}s", flush=True)
        session = Session(server, args, stubs, health_stub, tokenizer, refs, before)
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


@contextlib.contextmanager
def monitor(s: Session, period_s: float) -> Iterator[list[dict[str, Any]]]:
    """Health sampled in a thread while the block runs: the peaks and the RSS series for the report."""
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                samples.append({"t_s": round(time.perf_counter() - t0, 2), **health_view(health(s.health_stub))})
            stop.wait(period_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def peak(samples: list[dict[str, Any]], key: str) -> Any:
    return max((sample[key] for sample in samples), default=0)


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
    items: list[Planned] = []
    streams = crashes = 0
    while streams < n:
        if cfg.crash_every and streams >= (crashes + 1) * cfg.crash_every:
            k = min(cfg.crash_streams, n - streams)
            crash = [(rng.randrange(cfg.prompts), cfg.max_new, rng.randint(2, 6)) for _ in range(k)]
            items.append(Planned("crash", 0, cfg.max_new, crash=crash))
            streams, crashes = streams + k, crashes + 1
            continue
        kind = rng.choices(list(MIX), list(MIX.values()))[0]
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

    async def one(stub: Any, item: Planned) -> Outcome:
        timeout = item.timeout_s
        if item.kind == "deadline_running" and full is not None:
            timeout = item.deadline_fraction * full.now()
        planned = (item.kind, item.ref, item.max_new, timeout, item.stop_after)
        if item.kind != "disconnect":
            return await run_stream(s, stub, *planned)
        # A channel of its own: closing it ends this stream only.
        async with grpc.aio.insecure_channel(s.server.address) as channel:
            return await run_stream(s, pb_grpc.GenerationServiceStub(channel), *planned, channel)

    async def worker(w: int) -> None:
        stub = s.stubs[w % len(s.stubs)]
        while todo:
            item = todo.popleft()
            results = await run_crash_client(s, item.crash) if item.kind == "crash" else [await one(stub, item)]
            for r in results:
                if full is not None:
                    full.saw(r)
            outcomes.extend(results)
            if on_done is not None:
                on_done(len(outcomes))

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return outcomes


# ---- figures and checks -------------------------------------------------------------------------------------------


def ms(values: list[float], q: float, digits: int = 2) -> float | None:
    return round(1e3 * harness.pct(values, q), digits) if values else None


def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = collections.Counter(o.status for o in outcomes)
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, {}).setdefault(o.status, 0)
        by_kind[o.kind][o.status] += 1
    return {
        "requests": len(outcomes),
        **{status: counts[status] for status in STATUSES},
        "deadline_exceeded": sum(counts[status] for status in STATUSES if status.startswith("deadline")),
        "wrong_outputs": sum(1 for o in outcomes if o.problem),
        "output_tokens": sum(o.tokens for o in outcomes),
        "by_kind": by_kind,
        "errors_sample": sorted({o.error for o in outcomes if o.error})[:10],
        "wrong_sample": [o.problem for o in outcomes if o.problem][:10],
    }


def check(ok: bool, detail: str) -> dict[str, Any]:
    """A pass condition (all are required: one that fails fails the run)."""
    return {"ok": bool(ok), "detail": detail}


def all_of(good: int, total: int) -> dict[str, Any]:
    return check(good == total, f"{good}/{total}")


def leak_checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    leaked, before, after = report["leaked_rows"], report["kv_tokens_before"], report["kv_tokens_after"]
    waiting = report["waiting_tokens_after"]
    return {
        "no leaked rows": check(leaked == 0, f"running+waiting after idle = {leaked} ({report['idle_after_s']}s)"),
        "KV back to idle": check(after == before, f"{after} vs {before} before"),
        "no queued tokens counted": check(waiting == 0, f"waiting_tokens = {waiting}"),
    }


def server_checks(s: Session) -> dict[str, dict[str, Any]]:
    """The server's log reports no error (see bench.harness.log_errors), and it exits with 0 on SIGTERM."""
    first = f"; first: {s.log_errors[0][:200]}" if s.log_errors else ""
    return {
        "no ERROR lines in the server log": check(not s.log_errors, f"{len(s.log_errors)} lines{first}"),
        "server exits cleanly on SIGTERM": check(s.exit_code == 0, f"exit code {s.exit_code} after {s.stop_s:.1f}s"),
    }


# ---- the scenarios ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return int(2 * config["num_hidden_layers"] * kv_heads * head_dim * 4)  # K and V, float32


async def soak_scenario(path: Path, cfg: SoakConfig, log_dir: Path) -> dict[str, Any]:
    """The soak against its own server; returns the report (report['checks'][name]['ok'] all True = pass)."""
    rng = random.Random(cfg.seed)
    prompts = make_prompts(path, cfg.prompts, cfg.long_prompt_share, rng)
    args = (
        *("--max-batch-size", str(cfg.max_batch_size)),
        *("--kv-cache-bytes", str(cfg.kv_tokens * kv_bytes_per_token(path))),
        # The soak is about churn, not refusals: the queue holds every client (overload tests refusals).
        *("--max-waiting-requests", str(max(256, 2 * cfg.concurrency))),
        *("--max-waiting-tokens", str(4 * cfg.concurrency * (400 + cfg.max_new))),
    )
    async with serving(path, log_dir, "soak-server", prompts, cfg.max_new, cfg.channels, *args) as s:
        full_lone = statistics.median(r.lone_s for r in s.refs)
        full = FullLatency(4 * full_lone * cfg.concurrency / cfg.max_batch_size, cfg.max_new)
        with monitor(s, 1.0) as samples:
            warm_items, items = plan(cfg, cfg.warmup, rng), plan(cfg, cfg.requests, rng)
            t0 = time.perf_counter()
            warm = await drive(s, warm_items, cfg.concurrency, full)
            after_warm, _ = await s.wait_idle()
            print(f"  soak: warm-up of {len(warm)} streams in {time.perf_counter() - t0:.1f}s", flush=True)

            half: list[asyncio.Future[Any]] = []

            def on_done(done: int) -> None:
                if done >= len(items) // 2 and not half:
                    half.append(asyncio.ensure_future(asyncio.to_thread(health, s.health_stub)))

            t0 = time.perf_counter()
            outcomes = await drive(s, items, cfg.concurrency, full, on_done)
            wall = time.perf_counter() - t0
            print(f"  soak: {len(outcomes)} streams in {wall:.1f}s", flush=True)
            end, idle_s = await s.wait_idle()
        rss_half = (await half[0]).memory.process_rss_bytes if half else None
        # The server still answers every prompt correctly after the soak, one lone request at a time.
        probe = await drive(s, [Planned("probe", i, cfg.max_new) for i in range(len(prompts))], 1)

    counts, warm_counts = tally(outcomes), tally(warm)
    rss_base, rss_end = after_warm.memory.process_rss_bytes, end.memory.process_rss_bytes
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
        "peak_running": peak(samples, "requests_running"),
        "peak_waiting": peak(samples, "requests_waiting"),
        "peak_kv_cache_usage": peak(samples, "kv_cache_usage"),
        "health_before": health_view(s.before),
        "health_after_idle": health_view(end),
        **s.end_figures(end, idle_s),
        "rss_after_warmup_mib": round(rss_base / MIB, 1),
        "rss_half_mib": round(rss_half / MIB, 1) if rss_half is not None else None,
        "rss_end_mib": round(rss_end / MIB, 1),
        "rss_growth_mib": round(growth / MIB, 1),
        "rss_growth_pct": round(100 * growth / rss_base, 2),
        "rss_growth_per_1k_streams_kib": round(growth / 1024 / (len(outcomes) / 1000), 1),
        "rss_bound_mib": round(bound / MIB, 1),
        "post_probe_correct": f"{len(correct(probe))}/{len(probe)}",
        "rss_series": [(sample["t_s"], sample["rss_mib"]) for sample in samples],
    }

    def none_in_either(key: str) -> dict[str, Any]:
        return check(counts[key] + warm_counts[key] == 0, f"{counts[key]} (+{warm_counts[key]} in warm-up)")

    normal = counts["by_kind"].get("normal", {})
    growth_detail = f"{growth / MIB:+.1f} MiB ({100 * growth / rss_base:+.1f}%) <= {bound / MIB:.0f} MiB"
    report["checks"] = {
        "health reports the KV budget": check(s.before.kv_cache_budget_tokens > 0, "kv_cache_budget_tokens > 0"),
        "no other errors": none_in_either("error"),
        "no wrong outputs": none_in_either("wrong_outputs"),
        "every normal request completed": all_of(normal.get("completed", 0), sum(normal.values())),
        **leak_checks(report),
        "RSS growth within bound": check(growth <= bound, growth_detail),
        "server answers correctly after": all_of(len(correct(probe)), len(probe)),
        **server_checks(s),
    }
    return report


async def overload_scenario(path: Path, cfg: OverloadConfig, log_dir: Path) -> dict[str, Any]:
    """Capacity, then `factor` x capacity offered against a small waiting queue; returns the report."""
    rng = random.Random(cfg.seed)
    prompts = make_prompts(path, cfg.prompts, 0.0, rng)
    args = ("--max-batch-size", str(cfg.max_batch_size), "--max-waiting-requests", str(cfg.max_waiting_requests))
    async with serving(path, log_dir, "overload-server", prompts, cfg.new_tokens, 4, *args) as s:
        # Capacity: closed loop, one client per batch row.
        items = [Planned("capacity", rng.randrange(len(prompts)), cfg.new_tokens) for _ in range(cfg.capacity_requests)]
        t0 = time.perf_counter()
        capacity = await drive(s, items, cfg.max_batch_size)
        cap_wall = time.perf_counter() - t0
        cap_rate = len(capacity) / cap_wall
        await s.wait_idle()
        print(f"  overload: capacity {cap_rate:.1f} req/s at C={cfg.max_batch_size}", flush=True)

        # Overload: open loop, Poisson arrivals at factor x capacity.
        rate = cfg.factor * cap_rate
        tasks: list[asyncio.Task[Outcome]] = []
        with monitor(s, 0.5) as samples:
            t0 = time.perf_counter()
            next_at = 0.0
            while next_at < cfg.overload_s:
                delay = t0 + next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival process itself
                stub, r = s.stubs[len(tasks) % len(s.stubs)], rng.randrange(len(prompts))
                tasks.append(asyncio.ensure_future(run_stream(s, stub, "overload", r, cfg.new_tokens)))
                next_at += rng.expovariate(rate)
            offered_s = time.perf_counter() - t0
            overload = list(await asyncio.gather(*tasks))
            over_wall = time.perf_counter() - t0
        end, idle_s = await s.wait_idle()

        # The waiting queue's count came back to zero: max_waiting_requests requests at once all get in.
        n = cfg.max_waiting_requests
        probe = await drive(s, [Planned("probe", j % len(prompts), cfg.new_tokens) for j in range(n)], n)
        end2, _ = await s.wait_idle()

    admitted = [o for o in overload if o.status != "rejected"]
    rejected = [o for o in overload if o.status == "rejected"]
    completed, cap_ok = correct(admitted), correct(capacity)
    cap_lat, adm_lat = [o.latency_s for o in cap_ok], [o.latency_s for o in completed]
    rej_lat = [o.latency_s for o in rejected]
    pushbacks = [o.pushback_ms for o in rejected if o.pushback_ms is not None]
    everything = overload + capacity

    def over_capacity(q: float) -> float | None:
        return round(harness.pct(adm_lat, q) / harness.pct(cap_lat, q), 2) if adm_lat and cap_lat else None

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
        "admitted_p50_over_capacity_p50": over_capacity(0.5),
        "admitted_p99_over_capacity_p99": over_capacity(0.99),
        "goodput_tok_per_s": round(sum(o.tokens for o in completed) / over_wall, 1),
        "peak_running": peak(samples, "requests_running"),
        "peak_waiting": peak(samples, "requests_waiting"),
        "other_errors": sum(1 for o in everything if o.status == "error"),
        "errors_sample": sorted({o.error for o in everything if o.error})[:10],
        "wrong_outputs": sum(1 for o in everything if o.problem),
        "wrong_sample": [o.problem for o in everything if o.problem][:10],
        "by_status": dict(collections.Counter(o.status for o in overload)),
        **s.end_figures(end, idle_s),
        "queue_probe_admitted": f"{len(correct(probe))}/{len(probe)}",
        "health_after_probe": health_view(end2),
    }
    fast = bool(rej_lat and adm_lat) and harness.pct(rej_lat, 0.99) < harness.pct(adm_lat, 0.5)
    p99, p50 = report["rejection_latency_p99_ms"], report["admitted_latency_p50_ms"]
    report["checks"] = {
        "capacity run all correct": all_of(len(cap_ok), len(capacity)),
        "overload reached (some rejected)": check(bool(rejected), f"{len(rejected)} of {len(overload)} rejected"),
        "every admitted request completed correctly": all_of(len(completed), len(admitted)),
        "no other errors": check(report["other_errors"] == 0, str(report["other_errors"])),
        "every rejection carries grpc-retry-pushback-ms": all_of(len(pushbacks), len(rejected)),
        "rejections are fast (p99 below the admitted p50)": check(
            fast, f"rejection p99 {p99} ms vs admitted p50 {p50} ms"
        ),
        **leak_checks(report),
        "queue takes max_waiting_requests again": all_of(len(correct(probe)), len(probe)),
        **server_checks(s),
    }
    return report


# ---- report -------------------------------------------------------------------------------------------------------

# Each scenario's paragraph and table rows, filled from its report with str.format.
SOAK_TABLE = (
    "**Soak**: {requests} streams (+{warmup[requests]} warm-up) at concurrency {config[concurrency]}, "
    "max_batch_size {config[max_batch_size]}, KV budget {config[kv_tokens]} tokens, {config[prompts]} prompts, "
    "max_new_tokens 1-{config[max_new]}; {wall_s} s, {streams_per_s} streams/s, {output_tokens_per_s} output tok/s.",
    "| requests | {requests} |",
    "| completed (checked against the lone reference) | {completed} |",
    "| cancelled by the client | {cancelled} |",
    "| disconnected (channel closed) | {disconnected} |",
    "| crashed client (process exited) | {crashed} |",
    "| deadline exceeded: at admission / waiting / running | "
    "{deadline_at_admission} / {deadline_waiting} / {deadline_running} |",
    "| rejected (RESOURCE_EXHAUSTED) | {rejected} |",
    "| other errors | **{error}** |",
    "| wrong outputs | **{wrong_outputs}** |",
    "| leaked rows (running + waiting after idle) | **{leaked_rows}** (idle after {idle_after_s} s) |",
    "| KV tokens used: before / after | {kv_tokens_before} / {kv_tokens_after} |",
    "| queued tokens after | {waiting_tokens_after} |",
    "| peak running / waiting / KV usage | {peak_running} / {peak_waiting} / {peak_kv_cache_usage:.0%} |",
    "| RSS after warm-up / half-way / end | {rss_after_warmup_mib} / {rss_half_mib} / {rss_end_mib} MiB |",
    "| RSS growth (bound) | {rss_growth_mib:+} MiB, {rss_growth_pct:+}% "
    "({rss_growth_per_1k_streams_kib} KiB per 1k streams; bound {rss_bound_mib} MiB) |",
    "| normal request latency p50 / p99 | {normal_latency_p50_ms} / {normal_latency_p99_ms} ms |",
    "| after the soak: lone requests correct | {post_probe_correct} |",
    "| server log errors; exit code on SIGTERM | {server_log_errors}; {server_exit_code} |",
)
OVERLOAD_TABLE = (
    "**Overload**: max_batch_size {config[max_batch_size]}, --max-waiting-requests {config[max_waiting_requests]}, "
    "{config[new_tokens]} new tokens a request; capacity = closed loop at C={config[max_batch_size]} "
    "({capacity[requests]} requests); overload = Poisson arrivals at {config[factor]:g}x the capacity's "
    "request rate for {config[overload_s]:g} s.",
    "| capacity: throughput | {capacity[req_per_s]} req/s, {capacity[tok_per_s]} tok/s |",
    "| capacity: latency p50 / p99 | {capacity[latency_p50_ms]} / {capacity[latency_p99_ms]} ms |",
    "| offered (rate achieved / target) | {offered} ({offered_rate} / {offered_rate_target} req/s) |",
    "| admitted / completed correctly | {admitted} / {admitted_completed_correct} |",
    "| rejected (RESOURCE_EXHAUSTED) | {rejected} ({rejected_pct}%) |",
    "| rejection latency p50 / p99 / max | "
    "{rejection_latency_p50_ms} / {rejection_latency_p99_ms} / {rejection_latency_max_ms} ms |",
    "| rejections with grpc-retry-pushback-ms (range) | {rejections_with_pushback}/{rejected} "
    "({pushback_ms_min}-{pushback_ms_max} ms) |",
    "| admitted latency p50 / p99 | {admitted_latency_p50_ms} / {admitted_latency_p99_ms} ms |",
    "| admitted p50 / capacity p50 (p99 / p99) | **{admitted_p50_over_capacity_p50}** "
    "({admitted_p99_over_capacity_p99}) |",
    "| time to first token p50: capacity / admitted | {capacity[ttft_p50_ms]} / {admitted_ttft_p50_ms} ms |",
    "| goodput under overload vs capacity | {goodput_tok_per_s} vs {capacity[tok_per_s]} tok/s |",
    "| peak running / waiting | {peak_running} / {peak_waiting} |",
    "| other errors; wrong outputs | **{other_errors}**; **{wrong_outputs}** |",
    "| leaked rows; KV before / after; queued tokens after | **{leaked_rows}**; "
    "{kv_tokens_before} / {kv_tokens_after}; {waiting_tokens_after} |",
    "| queue probe ({config[max_waiting_requests]} at once after idle) | {queue_probe_admitted} admitted |",
)
TABLES = {"soak": SOAK_TABLE, "overload": OVERLOAD_TABLE}


def markdown(report: dict[str, Any]) -> str:
    lines = harness.header(report["title"], report)
    for scenario, (intro, *rows) in TABLES.items():
        if scenario in report:
            figures = report[scenario]
            lines += [intro.format(**figures), "", "| figure | value |", "|---|---:|"]
            lines += [row.format(**figures) for row in rows] + [""]
    lines += ["Pass conditions:", ""]
    for scenario in TABLES:
        for name, c in report.get(scenario, {}).get("checks", {}).items():
            lines.append(f"- {scenario}: {name}: {'pass' if c['ok'] else '**FAIL**'} ({c['detail']})")
    return "\n".join(lines) + "\n"


def failed(report: dict[str, Any]) -> list[str]:
    return [
        f"{scenario}: {name} ({c['detail']})"
        for scenario in TABLES
        for name, c in report.get(scenario, {}).get("checks", {}).items()
        if not c["ok"]
    ]


def main() -> None:
    if sys.argv[1:] == ["--crash-client"]:
        asyncio.run(crash_client_main())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred streams, about a minute")
    parser.add_argument("--scenario", choices=("soak", "overload", "both"), default="both")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/reliability.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()
    path, logs = harness.model_dir(MODEL, ns.cache_dir), harness.RESULTS
    report: dict[str, Any] = {
        "title": f"Soak and overload: tiny llama on CPU{' (quick)' if ns.quick else ''}",
        **harness.run_info("cpu", "bench.soak"),
    }
    if ns.scenario in ("soak", "both"):
        report["soak"] = asyncio.run(soak_scenario(path, QUICK_SOAK if ns.quick else SoakConfig(), logs))
    if ns.scenario in ("overload", "both"):
        report["overload"] = asyncio.run(
            overload_scenario(path, QUICK_OVERLOAD if ns.quick else OverloadConfig(), logs)
        )
    table = markdown(report)
    harness.save("soak", report, table)
    if ns.write_docs:
        harness.write_docs("reliability.md", "soak", table)
    problems = failed(report)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("all pass conditions met")


if __name__ == "__main__":
    main()
