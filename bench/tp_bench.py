"""Tensor parallelism on this machine's CPU, as measured: the server with --tensor-parallel-size 2 against
the same server on one rank, on a Llama of GPT-2-small's size, at 1 and at `--concurrency` streams.

Each arm is a real server (gloo between the two ranks' processes, the cores shared out between them), its
streams sent over gRPC (modelserve.v1 Generate) in a closed loop, every stream `--new-tokens` tokens long.
The servers run one at a time, alternating, `--repeats` times; the report gives each arm's median output
tokens per second and the two-rank arm's ratio to the one-rank arm's. On a 2-core machine two ranks have a
core each and two all-reduces per layer to wait on: slower, and said so. What tensor parallelism is for,
a model larger than one device, needs devices to show.

    python -m bench.tp_bench
    python -m bench.tp_bench --write-docs
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench import harness

PRESET = "llama-small"


def closed_loop(server: harness.ServerProcess, concurrency: int, requests: int, new_tokens: int) -> float:
    """Output tokens per second over `requests` streams, `concurrency` at a time."""
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    todo = list(range(requests))
    lock = threading.Lock()
    tokens = [0]
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                request = harness.generate_request(f"Request {i}: tell a long story about the sea.", new_tokens)
                got = sum(len(m.token_ids) for m in stub.Generate(request, timeout=600))
                with lock:
                    tokens[0] += got

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return tokens[0] / (time.perf_counter() - start)


def run(ns: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    runs = []
    for repeat in range(ns.repeats):
        for ranks in (1, 2) if repeat % 2 == 0 else (2, 1):
            server = harness.start_server(
                harness.RESULTS / "tp-logs",
                "--model",
                str(path),
                "--tensor-parallel-size",
                str(ranks),
                "--max-batch-size",
                str(ns.concurrency),
                name=f"tp{ranks}",
            )
            try:
                server.wait_serving()
                closed_loop(server, 2, 2, 8)  # warm-up
                for concurrency in (1, ns.concurrency):
                    tok_s = closed_loop(server, concurrency, 2 * concurrency, ns.new_tokens)
                    print(f"  repeat {repeat + 1} ranks {ranks} C={concurrency}: {tok_s:.1f} tok/s", flush=True)
                    runs.append({"repeat": repeat + 1, "ranks": ranks, "concurrency": concurrency, "tok_per_s": tok_s})
            finally:
                server.terminate()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    runs = run(ns, harness.model_dir(PRESET, ns.cache_dir))
    report: dict[str, Any] = {
        "title": f"Tensor parallelism on this CPU: {PRESET}, float32, two ranks against one",
        **harness.run_info("cpu", "bench.tp_bench"),
        "runs": runs,
    }
    lines = [
        *harness.header(
            report["title"],
            report,
            f"workload: closed loops of 1 and {ns.concurrency} gRPC streams, {ns.new_tokens} tokens each, greedy; "
            f"a server per arm, one at a time, alternating, {ns.repeats} repeats; medians",
        ),
        "| streams | 1 rank, tok/s | 2 ranks, tok/s | 2 ranks over 1 |",
        "|---:|---:|---:|---:|",
    ]
    for concurrency in (1, ns.concurrency):
        one, two = (
            statistics.median(r["tok_per_s"] for r in runs if r["ranks"] == n and r["concurrency"] == concurrency)
            for n in (1, 2)
        )
        lines.append(f"| {concurrency} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    table = "\n".join(lines) + "\n"
    harness.save("tp-cpu", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", "tp-cpu", table)


if __name__ == "__main__":
    main()
