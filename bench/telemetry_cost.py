"""What telemetry costs: the same gRPC workload against a server with telemetry on and one with
it off (--no-telemetry), in alternating rounds so the machine's drift hits both alike.

"On" is the default server: the tracing and RPC-metrics interceptors, the GenAI and engine
metrics, the step observer and the Prometheus endpoint (scraped once a second during the run,
as Prometheus would). The cost is the median over rounds of 1 - on/off, each round's pair run
back to back: the machine drifts between rounds more than telemetry costs, so unpaired
medians would mostly measure the drift.

    python bench/telemetry_cost.py                # writes JSON and a table to bench/results/
    python bench/telemetry_cost.py --write-docs   # and the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from serving_bench import (
    PRESETS,
    RESULTS,
    bench_model_dir,
    clean_token_ids,
    free_port,
    grpc_closed_loop,
    machine,
    make_workload,
    start_server,
    versions,
    write_docs,
)


def scrape_every_second(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                response.read()
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "modelserve")
    ns = parser.parse_args()

    from tokenizers import Tokenizer

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(ns.preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Short prompts, many tokens: the per-message and per-step costs of telemetry dominate here.
    workload = make_workload(tokenizer, clean_token_ids(tokenizer), ns.requests, 3, (16, 64), (32, 64))
    metrics_port = free_port()
    kv = ["--kv-cache-bytes", str(2 << 30)]
    servers = {
        "on": start_server(model_dir, "cpu", "float32", [*kv, "--metrics-port", str(metrics_port)]),
        "off": start_server(model_dir, "cpu", "float32", [*kv, "--no-telemetry"]),
    }
    tok_s: dict[str, list[float]] = {"on": [], "off": []}
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_second, args=(metrics_port, stop), daemon=True)
    scraper.start()
    try:
        for round_ in range(ns.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                results, wall = asyncio.run(grpc_closed_loop(servers[mode][1], workload, ns.concurrency, tokenizer))
                tok_s[mode].append(sum(r.output_tokens for r in results) / wall)
                print(f"  round {round_ + 1}, telemetry {mode}: {tok_s[mode][-1]:.1f} tok/s", flush=True)
    finally:
        stop.set()
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    on, off = statistics.median(tok_s["on"]), statistics.median(tok_s["off"])
    paired = [100 * (1 - a / b) for a, b in zip(tok_s["on"], tok_s["off"], strict=True)]
    cost = statistics.median(paired)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine("cpu"),
        "versions": versions(),
        "command": "python bench/telemetry_cost.py " + " ".join(sys.argv[1:]),
        "workload": f"{ns.requests} requests, prompts 16-64 tokens, 32-64 new tokens, C={ns.concurrency}, "
        f"{ns.preset} fp32 on CPU, {ns.rounds} alternating rounds",
        "tok_per_s": tok_s,
        "median_on": on,
        "median_off": off,
        "cost_percent_per_round": paired,
        "cost_percent": cost,
    }
    table = "\n".join(
        [
            "### Telemetry cost (on vs off, side by side)",
            "",
            f"- date: {report['date']}; machine: {report['machine']}",
            f"- versions: {report['versions']}",
            f"- command: `{report['command'].strip()}`",
            f"- workload: {report['workload']}; /metrics scraped every second while on",
            "",
            "| telemetry | output tok/s per round | median |",
            "|---|---|---:|",
            f"| on | {', '.join(f'{v:.1f}' for v in tok_s['on'])} | {on:.1f} |",
            f"| off | {', '.join(f'{v:.1f}' for v in tok_s['off'])} | {off:.1f} |",
            "",
            f"Cost per round (1 - on/off): {', '.join(f'{c:.1f}%' for c in paired)}.",
            "",
            f"Cost of telemetry, median of the rounds: **{cost:.1f}%** of throughput (goal: under 3%).",
            "",
        ]
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"telemetry-cost-{stamp}.json").write_text(json.dumps(report, indent=2))
    print("\n" + table)
    if ns.write_docs:
        write_docs(table, "telemetry-cost")


if __name__ == "__main__":
    main()
