"""vLLM's engine and ours with no server around them: the same prompts through vLLM's offline `LLM.generate`
(its engine core in a child process, vLLM's default) and through modelserve's in-process engine (its core on a
thread, as the tests and the other benches build it); each run a fresh process, the engines interleaved.

Why: bench.vllm_peer measures the two servers with `vllm bench serve`, whose client shares this machine's two
CPUs with the server under test. Run without any client, HTTP face or detokenizing frontend, the engines show
how much of a gap between the servers is the engines' own. Each run: `--concurrency` prompts of `--input-len`
random token ids (the same ids for both engines in a repeat, new ones each repeat), all submitted at once,
`--output-len` greedy tokens each with end-of-sequence ignored; output tokens over the wall time from
submitting to the last token, prefill included. vLLM runs in bench/.venv-vllm (`python -m bench.vllm_peer
--install`) with vLLM's thread binding and tcmalloc, as bench.vllm_peer runs its server.

    python -m bench.engine_peer --dtype bf16
    python -m bench.engine_peer --dtype fp32 --concurrency 1 32 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
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

# Run by bench/.venv-vllm's python; the __main__ guard matters: vLLM spawns its engine core, which imports
# this file again.
VLLM_SCRIPT = """
import json, sys, time

def main():
    from vllm import LLM, SamplingParams
    path, dtype, prompts_file, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prompts = json.load(open(prompts_file))
    llm = LLM(model=path, dtype=dtype, seed=0, max_model_len=len(prompts[0]) + output_len + 16)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
    warm = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], warm, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("ENGINE_PEER_RESULT " + json.dumps({"tokens": tokens, "wall_s": wall}), flush=True)

if __name__ == "__main__":
    main()
"""


async def _modelserve(path: Path, dtype: str, prompts: list[list[int]], output_len: int, kv_gib: int) -> None:
    """The worker's side: modelserve's engine as the server builds it, on this process's event loop."""
    from modelserve.config import Config
    from modelserve.engine.request import Request, SamplingParams
    from modelserve.server.lifecycle import build_engine, load

    config = Config(model=str(path), dtype=dtype, max_batch_size=max(len(prompts), 4), kv_cache_bytes=kv_gib << 30)
    engine = build_engine(config, load(config))
    engine.start(asyncio.get_running_loop())

    def requests(tag: str, count: int, new_tokens: int) -> list[Request]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return [Request(f"{tag}-{i}", tuple(p), params) for i, p in enumerate(prompts[:count])]

    try:
        await harness.engine_closed_loop(engine, requests("warm", 4, 8), 4)
        tokens, wall = await harness.engine_closed_loop(engine, requests("run", len(prompts), output_len), len(prompts))
    finally:
        engine.shutdown()
    print(RESULT + json.dumps({"tokens": tokens, "wall_s": wall}), flush=True)


def run_engine(engine: str, ns: argparse.Namespace, path: Path, prompts_file: Path, log: Path) -> dict[str, Any]:
    """One run of `engine` in a process of its own: its output tokens, wall seconds and tok/s."""
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
    with log.open("ab") as out:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, env=env, cwd=harness.ROOT, check=False)
    lines = [line for line in done.stdout.decode().splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} run failed ({done.returncode}); its log: {log}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT))
    return {**result, "tok_per_s": result["tokens"] / result["wall_s"]}


def markdown(report: dict[str, Any]) -> str:
    info = report["info"]
    lines = harness.header(
        f"Engines without servers: modelserve vs vLLM (CPU), {report['preset']}, {report['dtype']}, "
        f"{report['threads']} thread(s)",
        info,
        f"peer: {report['peer']}",
        f"workload: all C prompts of {report['input_len']} random token ids at once, {report['output_len']} greedy "
        "tokens each (end of sequence ignored); vLLM `LLM.generate`, modelserve's engine in-process; each run a "
        "fresh process, engines interleaved, new prompts each repeat",
    )
    lines += [
        "| C | modelserve tok/s | vLLM tok/s | modelserve / vLLM | runs (modelserve; vLLM) |",
        "|---:|---:|---:|---:|---|",
    ]
    for row in report["summary"]:
        runs = "; ".join(", ".join(f"{v:.0f}" for v in row["runs"][e]) for e in ENGINES)
        ratio = row["modelserve"] / row["vLLM"]
        lines.append(f"| {row['concurrency']} | {row['modelserve']:.1f} | {row['vLLM']:.1f} | {ratio:.2f}x | {runs} |")
    lines += ["", f"- medians of {report['repeats']} runs each; output tokens over the wall time, prefill included"]
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
    ns = parser.parse_args()
    if ns.worker:
        prompts = json.loads(Path(ns.worker[1]).read_text())
        asyncio.run(_modelserve(Path(ns.worker[0]), vllm_peer.DTYPES[ns.dtype], prompts, ns.output_len, ns.kv_gib))
        return
    if not (vllm_peer.VENV / "bin" / "python").exists():
        raise SystemExit(f"vLLM is not installed in {vllm_peer.VENV}: run `python -m bench.vllm_peer --install`")
    path = vllm_peer.words_model_dir(ns.preset, ns.cache_dir)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="engine-peer-") as tmp:
        log = Path(tmp) / "engines.log"
        for repeat in range(1, ns.repeats + 1):
            for concurrency in ns.concurrency:
                rng = random.Random(repeat * 1000 + concurrency)
                prompts = [[rng.randrange(vocab) for _ in range(ns.input_len)] for _ in range(concurrency)]
                prompts_file = Path(tmp) / "prompts.json"
                prompts_file.write_text(json.dumps(prompts))
                for engine in ENGINES if repeat % 2 else tuple(reversed(ENGINES)):
                    started = time.monotonic()
                    try:
                        result = run_engine(engine, ns, path, prompts_file, log)
                    except RuntimeError:
                        print(log.read_text()[-4000:], file=sys.stderr)
                        raise
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
    report = {
        "info": harness.run_info("cpu", "bench.engine_peer"),
        "peer": ", ".join(f"{k} {v}" for k, v in vllm_peer.peer_versions().items()),
        "preset": ns.preset,
        "dtype": ns.dtype,
        "threads": ns.threads,
        "input_len": ns.input_len,
        "output_len": ns.output_len,
        "repeats": ns.repeats,
        "runs": runs,
        "summary": summary,
    }
    harness.save(f"engine_peer-{ns.preset}-{ns.dtype}", report, markdown(report))


if __name__ == "__main__":
    main()
