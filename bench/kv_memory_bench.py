"""What a KV budget holds: long requests that start at once, and a long shared prefix served from the cache.

Starts a real server on the gpt2-small preset (fp32, a 256 MiB KV budget by default), then over gRPC:

1. sends 16 streams at once, each a short prompt with max_new_tokens 1,000 (EOS ignored), and polls
   Health while they run: how many ran at the same time, how many were refused, how full the KV got;
   each is cancelled once it has streamed `--tokens-each` tokens (running 16,000 tokens to the end
   only measures the CPU);
2. sends a prompt of a 1,000-token prefix and a question, then the same prefix with another
   question: the second's usage.cached_tokens and both TTFTs.

`--baseline-src DIR` runs the same against another checkout's src/ (e.g. the commit before engine
v2), side by side in one run.

    python -m bench.kv_memory_bench
    python -m bench.kv_memory_bench --baseline-src /tmp/old/src --write-docs
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from bench import harness

STREAMS = 16
MAX_NEW_TOKENS = 1000
PREFIX_TOKENS = 1000


def _stream(stub: Any, prompt: str, max_new: int, stop_after: int, seen: dict[str, Any]) -> None:
    """One Generate; cancelled after `stop_after` tokens. Records its first-token time and outcome."""
    started = time.perf_counter()
    call = stub.Generate(harness.generate_request(prompt, max_new), timeout=600)
    tokens = 0
    try:
        for message in call:
            if tokens == 0 and message.token_ids:
                seen["ttft_s"] = time.perf_counter() - started
            tokens += len(message.token_ids)
            if tokens >= stop_after:
                call.cancel()
                break
        seen["outcome"] = "ok"
    except grpc.RpcError as exc:
        seen["outcome"] = "cancelled" if exc.code() == grpc.StatusCode.CANCELLED else exc.code().name
    seen["tokens"] = tokens


def measure(src: str | None, ns: argparse.Namespace, name: str) -> dict[str, Any]:
    from modelserve_client.v1 import generation_pb2 as pb
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from tokenizers import Tokenizer

    path = harness.model_dir(ns.preset)
    env = {**os.environ, "PYTHONPATH": src} if src else None
    args = ("--model", str(path), "--dtype", "float32", "--kv-cache-bytes", str(ns.kv_bytes), "--max-batch-size", "32")
    server = harness.start_server(harness.RESULTS, *args, env=env, name="kv-baseline" if src else "kv-memory")
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            budget = stub.Health(pb.HealthRequest()).kv_cache_budget_tokens
            seen: list[dict[str, Any]] = [{} for _ in range(STREAMS)]
            threads = [
                threading.Thread(target=_stream, args=(stub, f"Hello number {i}", MAX_NEW_TOKENS, ns.tokens_each, s))
                for i, s in enumerate(seen)
            ]
            for thread in threads:
                thread.start()
            peak_running = peak_usage = 0.0
            while any(thread.is_alive() for thread in threads):
                health = stub.Health(pb.HealthRequest())
                peak_running = max(peak_running, health.requests_running)
                peak_usage = max(peak_usage, health.kv_cache_usage)
                time.sleep(0.05)
            for thread in threads:
                thread.join()
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            rng = random.Random(0)
            prefix = harness.make_prompt(tokenizer, harness.clean_token_ids(tokenizer), PREFIX_TOKENS, rng)
            prefix_text = tokenizer.decode(prefix)
            shared: list[dict[str, Any]] = []
            for question in (" And the first question?", " Then a second question?"):
                started = time.perf_counter()
                messages = list(stub.Generate(harness.generate_request(prefix_text + question, 4), timeout=600))
                call_s = time.perf_counter() - started  # 4 tokens: mostly the prompt's prefill
                shared.append({"cached_tokens": messages[-1].usage.cached_tokens, "call_s": call_s})
    finally:
        server.terminate()
    ttfts = [s["ttft_s"] for s in seen if "ttft_s" in s]
    return {
        "name": name,
        "kv_budget_tokens": budget,
        "peak_running": int(peak_running),
        "started": len(ttfts),
        "refused": sum(1 for s in seen if s.get("outcome") == "RESOURCE_EXHAUSTED"),
        "ttft_max_s": max(ttfts) if ttfts else None,
        "peak_kv_usage": peak_usage,
        "prefix": shared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--kv-bytes", type=int, default=256 << 20)
    parser.add_argument("--tokens-each", type=int, default=32, help="tokens each long stream streams, then cancels")
    parser.add_argument("--baseline-src", default="", help="another checkout's src/ to run side by side")
    parser.add_argument("--write-docs", action="store_true")
    ns = parser.parse_args()
    runs = [measure(None, ns, "this tree")]
    if ns.baseline_src:
        runs.append(measure(str(Path(ns.baseline_src).resolve()), ns, f"baseline {ns.baseline_src}"))
    info = harness.run_info("cpu", "bench.kv_memory_bench")
    lines = harness.header(
        f"KV memory: {ns.preset}, float32, {ns.kv_bytes >> 20} MiB of KV",
        info,
        f"workload: {STREAMS} streams at once, short prompts, max_new_tokens {MAX_NEW_TOKENS} (cancelled after "
        f"{ns.tokens_each} tokens each); then a {PREFIX_TOKENS}-token prefix with two questions, one after the other",
    )
    lines += [
        "| code | KV budget tokens | ran at once (peak) | started / refused | slowest first token s | peak KV use "
        "| prefix: 2nd cached tokens | prefix: 1st / 2nd call s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        first, second = run["prefix"]
        slowest = f"{run['ttft_max_s']:.2f}" if run["ttft_max_s"] is not None else "-"
        lines.append(
            f"| {run['name']} | {run['kv_budget_tokens']} | {run['peak_running']} | {run['started']} / "
            f"{run['refused']} | {slowest} | {run['peak_kv_usage']:.0%} | {second['cached_tokens']} | "
            f"{first['call_s']:.2f} / {second['call_s']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    harness.save(f"kv-memory-{ns.preset}", {**info, "runs": runs}, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"kv-memory-{ns.preset}", table)


if __name__ == "__main__":
    main()
