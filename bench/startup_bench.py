"""Server start-up and stop: seconds from `modelserve serve` to SERVING, the engine core's memory once it
serves, seconds from SIGTERM to the exit of an idle server, and the seconds a bad --model takes to be
refused; this tree against another checkout's, interleaved.

Each round starts this tree's server and the baseline's, one after the other, on the same model with the
default KV budget (4 GiB on a CPU), waits until grpc.health.v1 says SERVING, reads the resident memory of
the server's child processes, and stops it with SIGTERM; then each refuses a --model that does not exist.
Medians over the rounds.

    python -m bench.startup_bench --baseline-src /tmp/old/src --write-docs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import harness


def _env(src: str | None) -> dict[str, str] | None:
    return {**os.environ, "PYTHONPATH": src} if src else None


def serve_once(src: str | None, model: Path, name: str) -> dict[str, float]:
    """Seconds to SERVING, the children's resident MiB once it serves, and seconds from SIGTERM to its exit
    (an idle server: its drain's quiet wait, then its processes' ends)."""
    started = time.monotonic()
    server = harness.start_server(harness.RESULTS, "--model", str(model), env=_env(src), name=name)
    try:
        server.wait_serving()
        to_serving = time.monotonic() - started
        children = psutil.Process(server.proc.pid).children(recursive=True)
        rss = sum(child.memory_info().rss for child in children if child.is_running())
    finally:
        stopping = time.monotonic()
        server.terminate()
        stop = time.monotonic() - stopping
    return {"to_serving_s": to_serving, "children_rss_mib": rss / 2**20, "stop_s": stop}


def refuse_once(src: str | None) -> float:
    """Seconds until a server given a --model that does not exist has exited."""
    started = time.monotonic()
    ports = ("--port", "0", "--metrics-port", "0", "--http-port", "0")
    subprocess.run(
        [sys.executable, "-m", "modelserve", "serve", "--model", "/nonexistent/model", *ports],
        env=_env(src),
        capture_output=True,
        timeout=300,
        check=False,
    )
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama", choices=sorted(harness.PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-src", default="", help="another checkout's src/, run side by side")
    parser.add_argument("--write-docs", action="store_true")
    ns = parser.parse_args()
    model = harness.model_dir(ns.preset)
    codes: list[tuple[str, str | None]] = [("this tree", None)]
    if ns.baseline_src:
        codes.append((f"baseline {ns.baseline_src}", str(Path(ns.baseline_src).resolve())))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in codes}
    for round_ in range(ns.rounds):
        for name, src in codes:
            run = serve_once(src, model, "startup-baseline" if src else "startup")
            run["refused_s"] = refuse_once(src)
            samples[name].append(run)
            print(f"  round {round_ + 1}/{ns.rounds} {name}: {run}", flush=True)
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in samples.items()
    }
    info = harness.run_info("cpu", "bench.startup_bench")
    lines = harness.header(
        f"Start-up: {ns.preset}, float32, the default KV budget",
        info,
        f"workload: `modelserve serve --model` to SERVING, then SIGTERM until it exits; and a --model that does "
        f"not exist; {ns.rounds} interleaved rounds, medians",
    )
    lines += [
        "| code | to SERVING s | children's RSS once serving, MiB | SIGTERM to exit s | bad --model refused in s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in medians.items():
        lines.append(
            f"| {name} | {m['to_serving_s']:.1f} | {m['children_rss_mib']:,.0f} | {m['stop_s']:.1f} "
            f"| {m['refused_s']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    report: dict[str, Any] = {**info, "samples": samples, "medians": medians}
    harness.save(f"startup-{ns.preset}", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"startup-{ns.preset}", table)


if __name__ == "__main__":
    main()
