"""What telemetry costs: an A/B inside one server process, plus a per-request microbenchmark.

The A/B. The bench starts one server process (this file with --serve) that loads the model once,
builds ONE Engine and serves it through TWO grpc.aio servers on two loopback ports, in one
event loop:

  "on"  the tracing interceptor (aio_server_interceptor) and the RPC-metrics interceptor, a
        GenerationServicer attached with the GenerationMetrics, the engine gauges attached,
        the Prometheus endpoint up (scraped once a second by this process during "on" arms,
        as Prometheus would), and the engine's step observer recording;
  "off" no interceptors and a GenerationServicer attached with metrics=None: what
        --no-telemetry serves.

Both arms share the model, the engine, the event loop, the memory layout and the process's
neighbours on the machine, so what differs between them is telemetry and the moment they ran.
The engine's on_step is a StepSwitch: it forwards each step to GenerationMetrics.record_step
only while the switch is on. This process flips it over the server's stdin before each arm
("on" / "off", acknowledged on stdout); arms never overlap, so every step of an "on" arm is
recorded and no step of an "off" arm is. (The "off" arm therefore calls a one-line Python
function per engine step that --no-telemetry would not: well under a microsecond against a
step of 100+ ms.) Spans are made but not exported, as in a server with no OTLP endpoint set;
--export-spans adds a BatchSpanProcessor with an exporter that drops them.

The load is the closed loop of serving_bench (the same prompts, C=32), timed by window: each
arm starts C streams from the same request order, lets warm_s pass, counts the output tokens
that arrive in the next measure_s, then cancels its streams and waits until the engine is idle.
Stream i's first request asks for 1 + i * mean / C new tokens, so requests finish (and their
telemetry runs) at a steady rate from the start rather than in one wave a request's lifetime
later. A round is one "on" arm and one "off" arm back to back, in ABBA order (on-off, off-on,
...) so that drift within a round cancels over rounds; the cost of a round is 1 - on/off
throughput, and the claim is the median over rounds with its interquartile range and a
distribution-free 95% interval for the median.

The machine's other work is measured, not just suffered: for each arm the bench reads, from
/proc, the CPU time of the whole machine, of the server (and its event-loop and engine threads)
and of itself. That gives three more views of the same rounds: the cost adjusted for the other
load (log(on/off) regressed on the arms' difference in other load; the intercept is the cost at
equal load), the cost over the quiet rounds only, and the server's CPU time per output token,
on minus off, per thread (the event-loop thread's is the steadiest figure of all: it holds
most of telemetry's work and none of torch's).

The microbenchmark times, in this process, the telemetry work of one request of the workload's
shape: both interceptors wrapped around a stand-in handler that streams the request's messages
through the calls the servicer's _OutcomeTracker makes (span events, GenerationMetrics.request_finished),
against the same handler with no interceptors and metrics=None; plus one record_step call and
one /metrics scrape. Multiplied by the A/B's request, step and scrape rates, this gives the
telemetry CPU time per second of serving, free of the machine's noise: the direct cost. It
bounds the throughput cost only if a microsecond of telemetry delays generation by at most a
microsecond, which torch's spinning worker threads on a fully booked CPU need not honour.

    python bench/telemetry_cost.py --quick          # about 3 minutes: 4 rounds of short arms
    python bench/telemetry_cost.py --write-docs     # make bench-telemetry: 20-35 minutes, table into docs/benchmarks.md
    python bench/telemetry_cost.py --micro-only     # the microbenchmark alone, about a minute
    python bench/telemetry_cost.py --render bench/results/telemetry-cost-....json [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from serving_bench import (
    PRESETS,
    RESULTS,
    Req,
    bench_model_dir,
    clean_token_ids,
    free_port,
    ids_request,
    machine,
    make_workload,
    versions,
    write_docs,
)

PROMPT_RANGE = (16, 64)  # short prompts, many tokens: per-message and per-step telemetry weigh most here
NEW_RANGE = (32, 64)
GRPC_OPTIONS = [("grpc.so_reuseport", 0)]

# ---- the server process (--serve) --------------------------------------------------------------------------------


class StepSwitch:
    """The engine's on_step: counts every step, hands it to `record` only while `on`."""

    def __init__(self, record: Callable[[Any], None]) -> None:
        self.record = record
        self.on = False
        self.steps = 0
        self.engine_tid = 0  # the engine thread's OS id, for its CPU time in /proc

    def __call__(self, step: Any) -> None:
        self.steps += 1
        if self.on:
            self.record(step)
        elif not self.engine_tid:
            self.engine_tid = threading.get_native_id()


def _control(switch: StepSwitch, engine: Any, stop: Callable[[], None], stdin: IO[str], stdout: IO[str]) -> None:
    """Answer the bench's commands, one line each, on stdout as 'CTL ...'; EOF stops the server."""
    for line in stdin:
        command = line.strip()
        if command in ("on", "off"):
            switch.on = command == "on"
            reply = command
        elif command == "steps":
            reply = str(switch.steps)
        elif command == "idle":  # no request left in the engine and no step taken for half a second
            deadline, last, since = time.monotonic() + 120, switch.steps, time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(0.05)
                stats = engine.stats()
                if switch.steps != last or stats.running or stats.waiting:
                    last, since = switch.steps, time.monotonic()
                elif time.monotonic() - since >= 0.5:
                    break
            reply = "idle" if time.monotonic() < deadline else "busy"
        else:
            reply = f"unknown {command!r}"
        stdout.write(f"CTL {reply}\n")
        stdout.flush()
    stop()


async def serve_ab(ns: argparse.Namespace) -> None:
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    from modelserve.config import Config
    from modelserve.engine.engine import Engine, EngineConfig
    from modelserve.server.app import load, warm_up
    from modelserve.server.servicer import GenerationServicer, Phase
    from modelserve.telemetry.rpc_metrics import RpcMetricsInterceptor
    from modelserve.telemetry.setup import start_telemetry

    config = Config(
        model=str(ns.model_dir),
        host="127.0.0.1",
        device=ns.device,
        dtype=ns.dtype,
        max_batch_size=ns.max_batch_size,
        kv_cache_bytes=ns.kv_cache_bytes,
    )
    loop = asyncio.get_running_loop()
    model = load(config)
    metrics_port = free_port()
    telemetry = start_telemetry(metrics_host="127.0.0.1", metrics_port=metrics_port)
    telemetry.metrics.set_model(model.model_id)
    if ns.export_spans:
        telemetry.tracer_provider.add_span_processor(_discarding_span_processor())
    switch = StepSwitch(telemetry.metrics.record_step)
    # The engine's limits from the server's Config, field by field, as serve() fills them.
    limits = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(config, f.name)}
    engine = Engine(
        model.model,
        model.tokenizer,
        model.eos_token_ids,
        EngineConfig(**limits),
        model.max_sequence_length,
        on_step=switch,
    )
    engine.start(loop)
    await warm_up(engine, model)
    telemetry.metrics.attach_engine(engine.stats)

    on_server = grpc.aio.server(
        interceptors=[
            aio_server_interceptor(tracer_provider=telemetry.tracer_provider),
            RpcMetricsInterceptor(telemetry.meter),
        ],
        options=GRPC_OPTIONS,
    )
    off_server = grpc.aio.server(options=GRPC_OPTIONS)
    ports = []
    for server, metrics in ((on_server, telemetry.metrics), (off_server, None)):
        servicer = GenerationServicer(config)
        servicer.attach(model, engine, metrics)
        servicer.phase = Phase.SERVING
        pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()

    stopped = asyncio.Event()
    threading.Thread(
        target=_control,
        args=(switch, engine, lambda: loop.call_soon_threadsafe(stopped.set), sys.stdin, sys.stdout),
        daemon=True,
    ).start()
    print(f"READY {ports[0]} {ports[1]} {metrics_port} {threading.get_native_id()} {switch.engine_tid}", flush=True)
    await stopped.wait()
    for server in (on_server, off_server):
        await server.stop(1)
    engine.shutdown()
    telemetry.shutdown()


def _discarding_span_processor() -> Any:
    """A BatchSpanProcessor whose exporter drops the spans: the export path's cost without a collector."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return BatchSpanProcessor(Discard())


# ---- the bench: A/B rounds ---------------------------------------------------------------------------------------


class Server:
    """The --serve child: its ports and its control line."""

    def __init__(self, ns: argparse.Namespace, model_dir: Path) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            "--model-dir",
            str(model_dir),
            "--device",
            ns.device,
            "--dtype",
            ns.dtype,
            "--max-batch-size",
            str(ns.concurrency),
            "--kv-cache-bytes",
            str(ns.kv_cache_bytes),
            *(["--export-spans"] if ns.export_spans else []),
        ]
        with open(RESULTS / "telemetry-server.log", "wb") as log:  # the child keeps its own copy of the descriptor
            env = {**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if ns.omp_passive else {})}
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env
            )
        ready = self._line("READY ")
        on_port, off_port, metrics_port, self.loop_tid, self.engine_tid = (int(x) for x in ready.split()[1:])
        self.address = {"on": f"127.0.0.1:{on_port}", "off": f"127.0.0.1:{off_port}"}
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.strip()
        raise RuntimeError(f"the server exited (code {self.proc.wait()}); see {RESULTS / 'telemetry-server.log'}")

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line("CTL ").removeprefix("CTL ")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the server stops
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(30)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(path: str) -> float:
    """utime + stime of a process or thread, from its /proc stat file, in seconds."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class CpuSnapshot:
    """The clocks read at the edges of an arm's window."""

    wall: float
    steps: int
    server: float  # the server process, all threads
    loop: float  # its event-loop thread (gRPC, the servicer, interceptors, request metrics)
    engine: float  # its engine thread (the model's Python side, record_step; torch's first compute thread)
    bench: float  # this process (the load generator and the scraper)
    machine: float

    @classmethod
    def take(cls, server: Server) -> CpuSnapshot:
        pid = server.proc.pid
        return cls(
            time.perf_counter(),
            int(server.ask("steps")),
            _thread_cpu_s(f"/proc/{pid}/stat"),
            _thread_cpu_s(f"/proc/{pid}/task/{server.loop_tid}/stat"),
            _thread_cpu_s(f"/proc/{pid}/task/{server.engine_tid}/stat"),
            _thread_cpu_s("/proc/self/stat"),
            _machine_busy_s(),
        )


@dataclass
class Arm:
    mode: str
    tok_per_s: float
    req_per_s: float  # requests that finished inside the window
    steps_per_s: float
    loop_ms_per_token: float  # CPU time of the server's event-loop thread per output token
    engine_ms_per_token: float
    server_ms_per_token: float  # all of the server's threads
    foreign_cores: float  # other work on the machine during the window, in cores (not this bench, not its server)
    scrapes: int = 0


def scrape_every_second(url: str, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
            count[0] += 1
        except OSError:
            pass


async def windowed_arm(
    server: Server, mode: str, first: list[Any], requests: list[Any], warm_s: float, measure_s: float
) -> Arm:
    """One closed-loop stream per item of `first` (its first request), then `requests` in order; tokens and
    finished requests counted in the window."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    tokens = finished = 0
    failures: list[BaseException] = []
    async with grpc.aio.insecure_channel(server.address[mode]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        order = itertools.count()
        start = time.perf_counter()
        w0, w1 = start + warm_s, start + warm_s + measure_s

        async def client(request: Any) -> None:
            nonlocal tokens, finished
            while True:
                async for message in stub.Generate(request, timeout=3600):
                    if message.token_ids and w0 <= time.perf_counter() < w1:
                        tokens += len(message.token_ids)
                if w0 <= time.perf_counter() < w1:
                    finished += 1
                request = requests[next(order) % len(requests)]

        tasks = [asyncio.ensure_future(client(request)) for request in first]
        await asyncio.sleep(w0 - time.perf_counter())
        begin = CpuSnapshot.take(server)
        await asyncio.sleep(w1 - time.perf_counter())
        last = CpuSnapshot.take(server)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failures:
        raise RuntimeError(f"{len(failures)} streams failed in a {mode} arm: {failures[0]!r}")
    wall, per_token = last.wall - begin.wall, 1e3 / max(tokens, 1)
    ours = (last.server - begin.server) + (last.bench - begin.bench)
    return Arm(
        mode,
        tok_per_s=tokens / measure_s,
        req_per_s=finished / measure_s,
        steps_per_s=(last.steps - begin.steps) / wall,
        loop_ms_per_token=(last.loop - begin.loop) * per_token,
        engine_ms_per_token=(last.engine - begin.engine) * per_token,
        server_ms_per_token=(last.server - begin.server) * per_token,
        foreign_cores=max(0.0, (last.machine - begin.machine) - ours) / wall,
    )


def run_arm(
    server: Server, mode: str, first: list[Any], requests: list[Any], ns: argparse.Namespace, warm_s: float
) -> Arm:
    if server.ask(mode) != mode:
        raise RuntimeError(f"the server did not switch its step observer {mode}")
    stop, count = threading.Event(), [0]
    scraper = None
    if mode == "on":
        scraper = threading.Thread(target=scrape_every_second, args=(server.metrics_url, stop, count), daemon=True)
        scraper.start()
    try:
        arm = asyncio.run(windowed_arm(server, mode, first, requests, warm_s, ns.measure_s))
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
    arm.scrapes = count[0]
    if server.ask("idle") != "idle":
        print("  (the engine did not go idle within 120 s after the arm)", flush=True)
    return arm


# ---- the microbenchmark ------------------------------------------------------------------------------------------


_Details = collections.namedtuple("_Details", "method invocation_metadata")  # a grpc.HandlerCallDetails


class _Context:
    """What the interceptors and _OutcomeTracker read from a grpc.aio ServicerContext."""

    Metadatum = collections.namedtuple("Metadatum", "key value")

    def __init__(self) -> None:
        agent = f"grpc-python-asyncio/{grpc.__version__} grpc-c/50.0.0 (linux; chttp2)"
        self._metadata = (self.Metadatum("user-agent", agent),)

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:54321"

    def code(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 3600.0

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass


def microbenchmark(workload: list[Req], ns: argparse.Namespace) -> dict[str, Any]:
    """Telemetry's CPU time for one request of the workload's mean shape, per engine step and per scrape."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    from modelserve.engine.request import (
        EngineStats,
        Finish,
        FinishReason,
        Request,
        SamplingParams,
        StepRecord,
        StreamEvent,
        Timings,
    )
    from modelserve.server.servicer import _OutcomeTracker
    from modelserve.telemetry.rpc_metrics import RpcMetricsInterceptor
    from modelserve.telemetry.setup import start_telemetry

    metrics_port = free_port()
    telemetry = start_telemetry(metrics_host="127.0.0.1", metrics_port=metrics_port)
    telemetry.metrics.set_model("bench")
    # The same again with a span export path (BatchSpanProcessor); its own Prometheus reader, so that its
    # metrics cost what the others' do (a meter with no reader records next to nothing).
    exported = start_telemetry(metrics_host="127.0.0.1", metrics_port=free_port())
    exported.tracer_provider.add_span_processor(_discarding_span_processor())

    n_prompt = round(statistics.mean(len(r.prompt_ids) for r in workload))
    n_out = round(statistics.mean(r.max_new_tokens for r in workload))
    timings = Timings(queue_s=0.2, time_to_first_token_s=0.5, total_s=18.0)
    events = [StreamEvent("x", (k,), k + 1) for k in range(n_out - 1)]
    events.append(StreamEvent("x", (0,), n_out, finish=Finish(FinishReason.LENGTH, timings, 0, mean_logprob=-3.0)))
    message = object()  # the servicer builds a response per event in both arms; not telemetry
    shape = Request("bench", (0,) * n_prompt, SamplingParams(max_new_tokens=n_out))
    context = _Context()
    details = _Details("/modelserve.v1.GenerationService/Generate", context.invocation_metadata())

    def handler_for(metrics: Any) -> Any:
        async def generate(request: Any, ctx: Any) -> AsyncIterator[Any]:  # Generate's telemetry, engine aside
            outcome = _OutcomeTracker(metrics, shape, None)  # content tracing and logging off, the defaults
            try:
                yield message
                for event in events:
                    outcome.saw(event)
                    yield message
            finally:
                outcome.close(ctx)

        return grpc.unary_stream_rpc_method_handler(generate)

    def chain(interceptors: list[Any], handler: Any) -> Callable[[], Awaitable[Any]]:
        """grpc.aio's order: the first interceptor is the outermost."""

        async def run(index: int, d: Any) -> Any:
            if index == len(interceptors):
                return handler
            return await interceptors[index].intercept_service(lambda d2: run(index + 1, d2), d)

        return lambda: run(0, details)

    tracing = aio_server_interceptor(tracer_provider=telemetry.tracer_provider)
    rpc_metrics = RpcMetricsInterceptor(telemetry.meter)
    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        "off (no interceptors, metrics=None)": chain([], handler_for(None)),
        "tracing interceptor only": chain([tracing], handler_for(None)),
        "RPC-metrics interceptor only": chain([rpc_metrics], handler_for(None)),
        "GenerationMetrics only (request_finished)": chain([], handler_for(telemetry.metrics)),
        "on (all three)": chain([tracing, rpc_metrics], handler_for(telemetry.metrics)),
        "on, spans exported (BatchSpanProcessor)": chain(
            [aio_server_interceptor(tracer_provider=exported.tracer_provider), RpcMetricsInterceptor(exported.meter)],
            handler_for(exported.metrics),
        ),
    }

    async def one_request(make: Callable[[], Awaitable[Any]]) -> None:
        handler = await make()  # grpc.aio runs the interceptors' intercept_service for every call
        async for _ in handler.unary_stream(None, context):
            pass

    async def timed(make: Callable[[], Awaitable[Any]], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await one_request(make)
        return (time.perf_counter() - start) / n * 1e6

    async def measure() -> dict[str, list[float]]:
        per_block: dict[str, list[float]] = {name: [] for name in variants}
        for make in variants.values():  # warm up
            await timed(make, 20)
        for _ in range(ns.micro_blocks):  # interleaved, so that the machine's drift hits every variant alike
            for name, make in variants.items():
                per_block[name].append(await timed(make, 50))
        return per_block

    per_block = asyncio.run(measure())
    request_us = {name: statistics.median(v) for name, v in per_block.items()}
    off = request_us["off (no interceptors, metrics=None)"]

    steps = [StepRecord(32, 0, 0.0, 0.15), StepRecord(31, 48, 0.07, 0.15)]
    step_blocks = []
    for _ in range(ns.micro_blocks):
        start = time.perf_counter()
        for _ in range(500):
            for step in steps:
                telemetry.metrics.record_step(step)
        step_blocks.append((time.perf_counter() - start) / 1000 * 1e6)
    stats = EngineStats(running=32, waiting=2, kv_budget_tokens=50_000, kv_tokens_used=3_000)
    telemetry.metrics.attach_engine(lambda: stats)  # the scrape reads the engine gauges too, as in the server
    scrape_ms = []
    for _ in range(40):
        start = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            body = response.read()
        scrape_ms.append((time.perf_counter() - start) * 1e3)
    telemetry.shutdown()
    exported.shutdown()
    return {
        "request_shape": f"{n_prompt} prompt tokens, {n_out} output tokens = {n_out + 1} stream messages",
        "request_us": request_us,
        "request_telemetry_us": {name: us - off for name, us in request_us.items()},
        "per_block_us": per_block,
        "record_step_us": statistics.median(step_blocks),
        "scrape_ms": statistics.median(scrape_ms),
        "scrape_bytes": len(body),
        "exported_has_reader": True,  # runs before this fix timed the exported variant with no metric reader
    }


# ---- statistics and the report -----------------------------------------------------------------------------------


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: order statistics k and n-1-k (binomial, p = 1/2)."""
    ordered, n = sorted(values), len(values)
    k = 0
    while k + 1 < n / 2:
        outside = 2 * sum(math.comb(n, i) for i in range(k + 2)) / 2**n  # P(median outside [x(k+1), x(n-k-2)])
        if outside > 1 - confidence:
            break
        k += 1
    return ordered[k], ordered[n - 1 - k]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(values: list[float]) -> dict[str, Any]:
    """Median, interquartile range and a 95% interval for the median of per-round figures."""
    return {
        "n": len(values),
        "median": statistics.median(values),
        "iqr": quartiles(values),
        "median_95ci": median_interval(values),
    }


def load_adjusted(on: list[Arm], off: list[Arm]) -> dict[str, Any] | None:
    """The cost at equal other load: per round, log(on/off throughput) regressed on the difference in other
    load between the two arms (least squares); the intercept is the cost, the slope what a core of other
    load takes. The interval is a bootstrap over rounds (2,000 resamples, fixed seed)."""
    y = [math.log(a.tok_per_s / b.tok_per_s) for a, b in zip(on, off, strict=True)]
    x = [a.foreign_cores - b.foreign_cores for a, b in zip(on, off, strict=True)]
    if statistics.pstdev(x) < 0.05:  # the other load hardly differed between arms: nothing to adjust for
        return None

    def fit(idx: list[int]) -> tuple[float, float]:
        xs, ys = [x[i] for i in idx], [y[i] for i in idx]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((v - mx) ** 2 for v in xs)
        slope = sum((u - mx) * (v - my) for u, v in zip(xs, ys, strict=True)) / sxx if sxx > 1e-12 else 0.0
        return my - slope * mx, slope

    n = len(y)
    intercept, slope = fit(list(range(n)))
    rng = random.Random(0)
    boot = sorted(fit([rng.randrange(n) for _ in range(n)])[0] for _ in range(2000))
    lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
    return {
        "cost_percent": 100 * (1 - math.exp(intercept)),
        "cost_95ci": (100 * (1 - math.exp(hi)), 100 * (1 - math.exp(lo))),
        "percent_per_core_of_other_load": 100 * (1 - math.exp(slope)),
    }


def analyse(arms: dict[str, list[Arm]], quiet_cores: float) -> dict[str, Any]:
    on, off = arms["on"], arms["off"]
    cost = [100 * (1 - a.tok_per_s / b.tok_per_s) for a, b in zip(on, off, strict=True)]
    quiet = [c for c, a, b in zip(cost, on, off, strict=True) if max(a.foreign_cores, b.foreign_cores) < quiet_cores]
    off_tok_s = statistics.median(b.tok_per_s for b in off)
    cpu_cost = [100 * (1 - b.server_ms_per_token / a.server_ms_per_token) for a, b in zip(on, off, strict=True)]

    def cpu(field: str) -> dict[str, Any]:
        """The paired difference in a thread's CPU per output token, and what it comes to per second."""
        diff = [getattr(a, field) - getattr(b, field) for a, b in zip(on, off, strict=True)]
        summary = summarise(diff)
        return {
            "on_median": statistics.median(getattr(a, field) for a in on),
            "off_median": statistics.median(getattr(b, field) for b in off),
            "diff_ms_per_token": diff,
            "diff": summary,
            "ms_per_s_at_off_rate": summary["median"] * off_tok_s,  # ms of CPU per second of serving
        }

    return {
        "cost_percent": cost,
        "cost": summarise(cost),
        "quiet_cores": quiet_cores,
        "quiet_cost_percent": quiet,
        "quiet_cost": summarise(quiet) if len(quiet) >= 5 else None,
        "load_adjusted": load_adjusted(on, off) if len(on) >= 3 else None,
        "median_on": statistics.median(a.tok_per_s for a in on),
        "median_off": off_tok_s,
        "loop_cpu": cpu("loop_ms_per_token"),
        "engine_cpu": cpu("engine_ms_per_token"),
        "server_cpu": cpu("server_ms_per_token"),
        # What a CPU-bound server loses: 1 - (tokens per server CPU-second, on) / (the same, off).
        "cpu_cost_percent": cpu_cost,
        "cpu_cost": summarise(cpu_cost),
    }


def markdown(report: dict[str, Any]) -> str:
    ab, micro, rounds = report["ab"], report["micro"], report["rounds"]
    lines = [
        "### Telemetry cost: A/B in one server process (the figures the <3% claim rests on)",
        "",
        f"- date: {report['date']}; machine: {report['machine']}",
        f"- versions: {report['versions']}",
        f"- command: `{report['command']}`",
        f"- workload: {report['workload']}",
        "",
        "| round | order | on tok/s | off tok/s | cost (1 - on/off) | other load on / off, cores "
        "| event-loop CPU on / off, ms per token |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for i, (on, off) in enumerate(zip(rounds["on"], rounds["off"], strict=True)):
        order = "on, off" if i % 2 == 0 else "off, on"
        lines.append(
            f"| {i + 1} | {order} | {on['tok_per_s']:.1f} | {off['tok_per_s']:.1f} | {ab['cost_percent'][i]:+.1f}% "
            f"| {on['foreign_cores']:.2f} / {off['foreign_cores']:.2f} "
            f"| {on['loop_ms_per_token']:.3f} / {off['loop_ms_per_token']:.3f} |"
        )

    def claim(summary: dict[str, Any], unit: str = "%", digits: int = 1) -> str:
        (q1, q3), (lo, hi) = summary["iqr"], summary["median_95ci"]
        return (
            f"**{summary['median']:+.{digits}f}{unit}** (interquartile range {q1:+.{digits}f}{unit} to "
            f"{q3:+.{digits}f}{unit}; 95% interval for the median {lo:+.{digits}f}{unit} to {hi:+.{digits}f}{unit}; "
            f"{summary['n']} rounds)"
        )

    cost = ab["cost"]
    lo, hi = cost["median_95ci"]
    verdict = "met" if hi < 3 else "missed" if lo > 3 else "not resolved (the interval for the median spans 3%)"
    quiet = ab["quiet_cost"]
    n_quiet = len(ab["quiet_cost_percent"])
    quiet_line = f"Rounds where other work on the machine stayed under {ab['quiet_cores']:g} cores in both arms: " + (
        "all of them." if n_quiet == cost["n"] else claim(quiet) + "." if quiet else f"{n_quiet}, too few to summarise."
    )
    loop, engine, server = ab["loop_cpu"], ab["engine_cpu"], ab["server_cpu"]
    adjusted = ab["load_adjusted"]
    adjusted_line = (
        "Adjusted for the other load (per round, log(on/off) regressed on the difference in other load between "
        f"the arms; the intercept is the cost at equal load): **{adjusted['cost_percent']:+.1f}%** (95% bootstrap "
        f"interval {adjusted['cost_95ci'][0]:+.1f}% to {adjusted['cost_95ci'][1]:+.1f}%); each core of other load "
        f"took {adjusted['percent_per_core_of_other_load']:.0f}% of throughput."
        if adjusted
        else "Adjusted for the other load: not needed (it hardly differed between the arms of a round)."
    )
    lines += [
        "",
        f"Median output tok/s: on {ab['median_on']:.1f}, off {ab['median_off']:.1f}; "
        f"rounds with on slower than off: {sum(c > 0 for c in ab['cost_percent'])} of {cost['n']}.",
        "",
        f"Cost of telemetry in throughput, median of the paired rounds: {claim(cost)}. Goal under 3%: {verdict}.",
        "",
        adjusted_line,
        "",
        quiet_line,
        "",
        "CPU time the server spends per output token, on minus off, paired by round (less sensitive to the "
        "machine's other load than throughput is):",
        "",
        f"- event-loop thread: {claim(loop['diff'], ' ms', 3)} per token (on {loop['on_median']:.3f}, off "
        f"{loop['off_median']:.3f}); at the off rate that is {loop['ms_per_s_at_off_rate']:.1f} ms of CPU per "
        "second of serving",
        f"- engine thread: {claim(engine['diff'], ' ms', 3)} per token (on {engine['on_median']:.3f}, off "
        f"{engine['off_median']:.3f})",
        f"- whole server process: {claim(server['diff'], ' ms', 3)} per token (on {server['on_median']:.2f}, off "
        f"{server['off_median']:.2f})",
    ]
    if "cpu_cost" in ab:
        lines.append(
            f"- as the throughput a CPU-bound server loses (1 - on/off output tokens per server CPU-second): "
            f"{claim(ab['cpu_cost'])}"
        )
    lines += [
        "",
        f"Microbenchmark, the telemetry work of one request ({micro['request_shape']}), "
        f"median of {report['micro_blocks']} interleaved blocks of 50:",
        "",
        "| path | us per request | telemetry us per request (minus off) |",
        "|---|---:|---:|",
    ]
    for name, us in micro["request_us"].items():
        if "exported" in name and not micro.get("exported_has_reader"):
            continue  # timed with no metric reader behind it: not comparable
        extra = micro["request_telemetry_us"][name]
        lines.append(f"| {name} | {us:.1f} | {'-' if name.startswith('off') else f'{extra:.1f}'} |")
    bound = report["bound"]
    lines += [
        "",
        f"Per engine step `record_step` takes {micro['record_step_us']:.1f} us; a /metrics scrape "
        f"({micro['scrape_bytes']:,} bytes) {micro['scrape_ms']:.2f} ms. At the A/B's rates (on arms, medians: "
        f"{bound['req_per_s']:.2f} requests/s, i.e. {1e3 * bound['server_s_per_request']:.0f} ms of serving per "
        f"request; {bound['steps_per_s']:.1f} steps/s; 1 scrape/s) telemetry takes "
        f"{bound['request_ms_per_s']:.2f} + {bound['step_ms_per_s']:.2f} + {bound['scrape_ms_per_s']:.2f} = "
        f"**{bound['total_ms_per_s']:.2f} ms of CPU per second of serving ({bound['total_percent']:.2f}% of a "
        "core)**: telemetry's direct cost, free of the machine's noise. It bounds the throughput cost if each "
        "microsecond of telemetry delays generation by at most a microsecond.",
        "",
    ]
    return "\n".join(lines)


def run_bench(ns: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    workload = make_workload(tokenizer, clean_token_ids(tokenizer), ns.requests, 3, PROMPT_RANGE, NEW_RANGE)
    # Staggered starts: stream i first asks for a short request, 1 + i * mean / C new tokens, so completions
    # (and the per-request telemetry) come at a steady rate from the start, not in a wave after one lifetime.
    mean_new = statistics.mean(r.max_new_tokens for r in workload)
    first = [
        ids_request(Req(r.prompt_ids, 1 + int(i * mean_new / ns.concurrency)), tokenizer)
        for i, r in enumerate(workload[: ns.concurrency])
    ]
    requests = [ids_request(r, tokenizer) for r in workload[ns.concurrency :] + workload[: ns.concurrency]]
    arms: dict[str, list[Arm]] = {"on": [], "off": []}
    started = time.monotonic()
    server = Server(ns, model_dir)
    print(f"server up in {time.monotonic() - started:.0f}s: {server.address}", flush=True)
    try:
        for mode in ("off", "on"):  # one unrecorded pair: first-call costs on both paths
            run_arm(server, mode, first, requests, ns, warm_s=2)
        for round_ in range(ns.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                arm = run_arm(server, mode, first, requests, ns, ns.warm_s)
                arms[mode].append(arm)
                print(
                    f"  round {round_ + 1}, telemetry {mode}: {arm.tok_per_s:.1f} tok/s, {arm.req_per_s:.2f} req/s, "
                    f"{arm.steps_per_s:.1f} steps/s; loop {arm.loop_ms_per_token:.3f} ms/token; "
                    f"other load {arm.foreign_cores:.2f} cores",
                    flush=True,
                )
            on, off = arms["on"][-1].tok_per_s, arms["off"][-1].tok_per_s
            print(f"  round {round_ + 1}: cost {100 * (1 - on / off):+.1f}%", flush=True)
    finally:
        server.close()

    print("microbenchmark ...", flush=True)
    micro = microbenchmark(workload, ns)
    req_per_s = statistics.median(a.req_per_s for a in arms["on"])
    steps_per_s = statistics.median(a.steps_per_s for a in arms["on"])
    request_ms = micro["request_telemetry_us"]["on (all three)"] * req_per_s / 1e3
    step_ms = micro["record_step_us"] * steps_per_s / 1e3
    total_ms = request_ms + step_ms + micro["scrape_ms"]
    bound = {
        "req_per_s": req_per_s,
        "server_s_per_request": 1 / req_per_s if req_per_s else math.inf,
        "steps_per_s": steps_per_s,
        "request_ms_per_s": request_ms,
        "step_ms_per_s": step_ms,
        "scrape_ms_per_s": micro["scrape_ms"],
        "total_ms_per_s": total_ms,
        "total_percent": total_ms / 10,
    }
    quick = " (quick)" if ns.quick else ""
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(ns.device),
        "versions": versions(),
        "command": ("python bench/telemetry_cost.py " + " ".join(sys.argv[1:])).strip(),
        "workload": (
            f"{ns.preset} {ns.dtype} on {ns.device}; closed loop C={ns.concurrency} over {ns.requests} requests "
            f"(prompts {PROMPT_RANGE[0]}-{PROMPT_RANGE[1]} tokens, {NEW_RANGE[0]}-{NEW_RANGE[1]} new tokens, "
            f"greedy, EOS off); {ns.rounds} rounds{quick}, each an on arm and an off arm in ABBA order, "
            f"an arm = {ns.warm_s:g} s warm-up + {ns.measure_s:g} s counted; one server process, two ports; "
            f"/metrics scraped every second during on arms"
            + ("; spans exported to a discarding BatchSpanProcessor" if ns.export_spans else "; spans not exported")
        ),
        "rounds": {mode: [asdict(a) for a in arms[mode]] for mode in ("on", "off")},
        "ab": analyse(arms, ns.quiet_cores),
        "micro": micro,
        "micro_blocks": ns.micro_blocks,
        "bound": bound,
    }
    table = markdown(report)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"telemetry-cost-{stamp}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"telemetry-cost-{stamp}.md").write_text(table)
    print("\n" + table)
    if ns.write_docs:
        write_docs(table, "telemetry-cost")


def micro_only(ns: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    workload = make_workload(tokenizer, clean_token_ids(tokenizer), ns.requests, 3, PROMPT_RANGE, NEW_RANGE)
    micro = microbenchmark(workload, ns)
    print(f"one request: {micro['request_shape']}; median of {ns.micro_blocks} interleaved blocks of 50")
    for name, us in micro["request_us"].items():
        print(f"  {name}: {us:.1f} us per request, telemetry {micro['request_telemetry_us'][name]:.1f} us")
    print(f"  record_step: {micro['record_step_us']:.1f} us; /metrics scrape: {micro['scrape_ms']:.2f} ms")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {"date": dt.date.today().isoformat(), "machine": machine("cpu"), "versions": versions(), "micro": micro}
    report["command"] = ("python bench/telemetry_cost.py " + " ".join(sys.argv[1:])).strip()
    (RESULTS / f"telemetry-micro-{stamp}.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of 4 s + 8 s arms: about 3 minutes")
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128, help="distinct requests the streams cycle through")
    parser.add_argument("--rounds", type=int, default=24, help="pairs of arms (on + off)")
    parser.add_argument("--warm-s", type=float, default=6.0, help="seconds of each arm before counting")
    parser.add_argument("--measure-s", type=float, default=15.0, help="seconds of each arm counted")
    parser.add_argument("--micro-blocks", type=int, default=30)
    parser.add_argument(
        "--quiet-cores", type=float, default=0.3, help="a round is quiet when other work stayed under this"
    )
    parser.add_argument("--export-spans", action="store_true", help="give the tracer a (discarding) span exporter")
    parser.add_argument("--kv-cache-bytes", type=int, default=2 << 30)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "modelserve")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for the server: torch's threads sleep instead of spinning while they wait",
    )
    parser.add_argument("--micro-only", action="store_true", help="only the microbenchmark (no server, ~1 minute)")
    parser.add_argument("--render", type=Path, help="print the table of a saved bench/results JSON; no run")
    # The server side (started by the bench itself):
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-size", type=int, default=32, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(serve_ab(ns))
        return
    if ns.render:  # a saved run's report again (after a change to the wording), and into the docs with --write-docs
        report = json.loads(ns.render.read_text())
        arms = {mode: [Arm(**arm) for arm in report["rounds"][mode]] for mode in ("on", "off")}
        report["ab"] = analyse(arms, report["ab"].get("quiet_cores", ns.quiet_cores))  # with the current analysis
        table = markdown(report)
        print(table)
        if ns.write_docs:
            write_docs(table, "telemetry-cost")
        return
    if ns.quick:
        ns.rounds, ns.warm_s, ns.measure_s, ns.micro_blocks = 4, 4.0, 8.0, 10
    if ns.micro_only:
        micro_only(ns)
        return
    run_bench(ns)


if __name__ == "__main__":
    main()
