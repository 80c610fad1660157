"""Busy-neighbour benchmark: output tok/s with every CPU free, and with another process holding one CPU.

A real server per model (the demo model, and the GPT-2-small-shaped random model), driven over gRPC by
closed loops of C clients (each sends its next request when its last one has ended). Every figure is a
time window (`--window-s`, after `--warmup-s`), not a request count, so a collapsed case costs no more
time than a healthy one. The neighbour is a Python busy loop pinned to one CPU (`--busy-cpu`), as another
tenant's process would be; the server is not pinned. Quiet and busy windows take turns, in alternating
order each round, and the table reports their medians over `--rounds`, so the machine's other load
falls on both alike. The goal (issue 17): busy at least half of quiet, at every C.

With --spinning, a second server per model runs with OpenMP's default waits (a thread spins before it
sleeps: the engine core before issue 17), its windows taking turns with the first's.

Writes JSON and a markdown table to bench/results/.

    python -m bench.neighbour_bench                # about 4 minutes on 2 CPUs
    python -m bench.neighbour_bench --spinning     # about 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import harness

DEMO = "demo"  # the server's own demo model (no --model)
GOAL = 0.5  # busy over quiet, at least
PROMPTS = 64  # distinct prompts, so that the prefix cache does not skip every prefill
# libgomp's defaults, set explicitly: the engine core sets OMP_WAIT_POLICY=PASSIVE unless the user set one.
SPINNING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


@contextlib.contextmanager
def busy_loop(cpu: int | None) -> Iterator[list[int]]:
    """A Python busy loop pinned to `cpu` while the block runs (none where `cpu` is None): a neighbour that
    never sleeps. Yields the pids it started."""
    if cpu is None:
        yield []
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(proc.pid, {cpu})
        yield [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def others_cpu_seconds(mine: list[int]) -> float:
    """The CPU seconds all CPUs together have been busy, less those of the processes `mine`: the load of
    everything else on the machine (other users' work), which no run here controls."""
    machine = psutil.cpu_times()
    return float(sum(machine) - machine.idle - machine.iowait) - sum(
        sum(psutil.Process(pid).cpu_times()[:2]) for pid in mine
    )


async def window_tokens(
    address: str, prompts: list[str], concurrency: int, max_new: int, warmup_s: float, window_s: float, mine: list[int]
) -> tuple[float, float]:
    """Output tok/s over `window_s` seconds of `concurrency` closed-loop clients, counted after `warmup_s`,
    and how many CPUs the processes other than `mine` kept busy meanwhile."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    counting = False
    tokens = 0
    cycle = itertools.cycle(prompts)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def client() -> None:
            nonlocal tokens
            while True:
                async for message in stub.Generate(harness.generate_request(next(cycle), max_new)):
                    if counting:
                        tokens += len(message.token_ids)

        clients = [asyncio.ensure_future(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)  # the window's own timing, not a wait for state
        counting, start, others = True, time.perf_counter(), others_cpu_seconds(mine)
        await asyncio.sleep(window_s)
        counting, wall, others = False, time.perf_counter() - start, others_cpu_seconds(mine) - others
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return tokens / wall, others / wall


def model_args(preset: str, cache_dir: Path) -> tuple[list[str], Path]:
    """The server's --model flags for `preset` and the directory its tokenizer is in."""
    if preset == DEMO:
        from modelserve.models.demo import demo_model_dir

        return [], demo_model_dir(cache_dir)
    path = harness.model_dir(preset, cache_dir)
    return ["--model", str(path)], path


def measure_preset(preset: str, ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The servers of one model (the default, and with --spinning the spinning one): quiet and busy
    windows at each C, every server and case taking turns, for `ns.rounds` rounds; a row per server."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from tokenizers import Tokenizer

    flags, path = model_args(preset, ns.cache_dir)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool, rng = harness.clean_token_ids(tokenizer), random.Random(3)
    prompts = [tokenizer.decode(harness.make_prompt(tokenizer, pool, ns.prompt_tokens, rng)) for _ in range(PROMPTS)]
    flags += ["--cache-dir", str(ns.cache_dir), "--max-batch-size", str(max(ns.concurrency))]
    flags += ["--kv-cache-bytes", str(ns.kv_cache_mib << 20)]
    variants = {"OpenMP waits passive (default)": {}, **({"OpenMP waits spinning": SPINNING} if ns.spinning else {})}
    servers = {
        name: harness.start_server(harness.RESULTS, *flags, env=env, name=f"neighbour-{preset}")
        for name, env in variants.items()
    }
    samples: dict[tuple[str, int, str], list[float]] = {
        (name, c, case): [] for name in servers for c in ns.concurrency for case in ("quiet", "busy")
    }
    others_load: dict[tuple[str, int, str], list[float]] = {key: [] for key in samples}
    try:
        for server in servers.values():
            server.wait_serving(timeout_s=600)
        for round_, (name, server), c in itertools.product(range(ns.rounds), servers.items(), ns.concurrency):
            with server.channel() as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                tree = psutil.Process(server.proc.pid)
                server_pids = [os.getpid(), tree.pid, *(child.pid for child in tree.children(recursive=True))]
                for case in ("quiet", "busy") if round_ % 2 == 0 else ("busy", "quiet"):
                    with busy_loop(ns.busy_cpu if case == "busy" else None) as busy:
                        mine = server_pids + busy
                        rate, others = asyncio.run(
                            window_tokens(server.address, prompts, c, ns.max_new_tokens, ns.warmup_s, ns.window_s, mine)
                        )
                    harness.wait_idle(stub)  # the cancelled streams are gone before the next window
                    samples[(name, c, case)].append(rate)
                    others_load[(name, c, case)].append(others)
                    print(
                        f"  {preset}, {name}, round {round_ + 1}, C={c} {case}: {rate:.1f} tok/s "
                        f"(other processes: {others:.2f} CPUs)",
                        flush=True,
                    )
        logs = {name: server.log() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.terminate(120)
    errors = [error for log in logs.values() for error in harness.log_errors(log)]
    assert not errors, f"the servers logged errors: {errors}"
    rows = []
    for name, c in itertools.product(servers, ns.concurrency):
        quiet, loaded = (statistics.median(samples[(name, c, case)]) for case in ("quiet", "busy"))
        threads = next((line.split(": ", 1)[-1] for line in logs[name].splitlines() if "torch threads" in line), "")
        rows.append(
            {
                "model": preset,
                "server": name,
                "threads": threads,
                "concurrency": c,
                "quiet_tok_per_s": quiet,
                "busy_tok_per_s": loaded,
                "busy_over_quiet": loaded / quiet,
                "quiet_samples": samples[(name, c, "quiet")],
                "busy_samples": samples[(name, c, "busy")],
                "others_cpus_quiet": others_load[(name, c, "quiet")],
                "others_cpus_busy": others_load[(name, c, "busy")],
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *harness.header(report["title"], report, f"workload: {report['workload']}"),
        "| model | server | C | quiet tok/s | busy neighbour tok/s | busy / quiet | others' CPUs quiet / busy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        verdict = "met" if row["busy_over_quiet"] >= GOAL else "MISSED"
        others = (statistics.median(row[f"others_cpus_{case}"]) for case in ("quiet", "busy"))
        lines.append(
            f"| {row['model']} | {row['server']} | {row['concurrency']} | {row['quiet_tok_per_s']:.1f} | "
            f"{row['busy_tok_per_s']:.1f} | **{row['busy_over_quiet']:.2f}** (>= {GOAL}: {verdict}) | "
            f"{' / '.join(f'{cpus:.2f}' for cpus in others)} |"
        )
    threads = {(row["model"], row["threads"]) for row in report["rows"] if row["threads"]}
    lines += ["", *(f"- {model}: `{line}`" for model, line in sorted(threads))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[DEMO, "gpt2-small"], choices=[DEMO, *sorted(harness.PRESETS)])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="each server's --kv-cache-bytes, in MiB")
    parser.add_argument("--busy-cpu", type=int, default=max(os.sched_getaffinity(0)))
    parser.add_argument("--spinning", action="store_true", help="also a server with OpenMP's default waits")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    rows = [row for preset in ns.presets for row in measure_preset(preset, ns)]
    report = {
        "title": "Busy neighbour: output tok/s quiet and with a busy loop on one CPU",
        **harness.run_info("cpu", "bench.neighbour_bench"),
        "workload": (
            f"{ns.prompt_tokens}-token prompts, {ns.max_new_tokens} new tokens, greedy, EOS off; closed loop "
            f"C={'/'.join(map(str, ns.concurrency))}; {ns.window_s:g} s windows after {ns.warmup_s:g} s warm-up, "
            f"medians of {ns.rounds} rounds, quiet and busy taking turns; busy: `while True: pass` pinned to "
            f"CPU {ns.busy_cpu}" + (f"; spinning: the server's environment has {SPINNING}" if ns.spinning else "")
        ),
        "rows": rows,
    }
    harness.save("neighbour", report, markdown(report))


if __name__ == "__main__":
    main()
