"""INT8 weight-only quantisation against bf16 and fp32: decode speed, weight memory and greedy agreement.

Each variant is loaded as the server loads it (server.lifecycle.load: --dtype, --quantization) and driven
through the engine core in this process, no server (as bench/step_profile.py does), so the figures are
the model's and the engine's, not gRPC's. All variants are measured in one run, taking turns (rounds), so
their ratios compare figures taken side by side:

- decode tok/s: `batch` rows decoding after a `context`-token prompt each, rows / the median engine step;
  the median over rounds;
- weights: the bytes of the model's parameters and buffers;
- agreement with the fp32 model: 32 prompts x 64 greedy tokens through the engine. "position" is the
  share of tokens equal at the same position (a first difference usually changes what follows),
  "prefix" the mean count of leading tokens equal, "top-1" the share of positions of the fp32 model's
  own continuation where the variant's greedy choice is the same (teacher forcing: every position counts).
- engine-core RSS: what the memory saving is for, measured where it counts. Each variant is served by a
  real `modelserve serve` (--kv-cache-bytes, 256 MiB by default), the servers started one after another,
  the variants taking turns (rounds); once one serves and has answered a short Generate, its engine-core
  process's resident memory is read (the process the log's "engine core: process N" line names), with the
  weight bytes its ModelInfo reports. The median over rounds.

Writes JSON and a markdown table to bench/results/, with --write-docs the table into docs/benchmarks.md.

    python -m bench.quant_bench --write-docs
    python -m bench.quant_bench --only-rss --dtype-variants float32    # fp32 vs int8: engine-core RSS only
    python -m bench.quant_bench --device cuda --dtype-variants bfloat16 --preset llama-1b
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.step_profile import engine_step_ms

AGREEMENT_KV_BYTES = 1 << 30  # enough KV for the agreement run's rows at every preset
RSS_KV_BYTES = 256 << 20  # the engine-core RSS figure's KV pool (--kv-cache-bytes)
_CORE_PID = re.compile(r"engine core: process (\d+) on")


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    quantization: str


def generate_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Every prompt's `new_tokens` greedy tokens (EOS ignored), all in one batch through the engine core."""
    from modelserve.engine.engine import EngineConfig
    from modelserve.engine.protocol import AddRequest
    from modelserve.engine.request import Request, SamplingParams

    longest = max(len(p) for p in prompts) + new_tokens
    config = EngineConfig(max_batch_size=len(prompts), kv_cache_bytes=AGREEMENT_KV_BYTES)
    core = config.build_core(model, (), longest + 8, observed=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for key, prompt in enumerate(prompts):
        core.apply(AddRequest(key, Request(str(key), tuple(prompt), params)))
    outputs: list[list[int]] = [[] for _ in prompts]
    while core.has_work():
        for row in core.step().rows:
            if row.token_id >= 0:
                outputs[row.key].append(row.token_id)
    return outputs


@torch.inference_mode()
def greedy_choices(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> list[int]:
    """The model's greedy token after each prefix of prompt + continuation[:-1] (teacher forcing)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + continuation[:-1]], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    return [int(t) for t in logits.argmax(-1).tolist()]


def agreement(
    reference: list[list[int]], outputs: list[list[int]], ref_choices: list[list[int]], choices: list[list[int]]
) -> dict[str, float]:
    """How closely a variant's greedy outputs follow the reference's (see the module docstring)."""
    pairs = list(zip(reference, outputs, strict=True))
    total = sum(len(r) for r in reference)
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, o, strict=True)) if a != b), len(r)) for r, o in pairs]
    top1 = sum(a == b for rc, c in zip(ref_choices, choices, strict=True) for a, b in zip(rc, c, strict=True))
    return {
        "position": sum(a == b for r, o in pairs for a, b in zip(r, o, strict=True)) / total,
        "prefix": statistics.mean(prefixes),
        "top1": top1 / sum(len(rc) for rc in ref_choices),
    }


def engine_rss(path: Path, variant: Variant, device: str, kv_bytes: int, log_dir: Path) -> tuple[int, int]:
    """(engine-core RSS, ModelInfo.weight_bytes) of a server on `path` run as `variant`, once it serves and
    has generated: the resident memory that int8 should lower, read where the weights live."""
    import psutil
    from modelserve_client.v1 import generation_pb2 as pb
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

    args = ["--model", str(path), "--device", device, "--dtype", variant.dtype, "--quantization", variant.quantization]
    server = harness.start_server(
        log_dir, *args, "--kv-cache-bytes", str(kv_bytes), name=f"rss-{variant.dtype}-{variant.quantization}"
    )
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            params = pb.GenerationParameters(max_new_tokens=16, temperature=0.0, ignore_eos=True)
            list(stub.Generate(pb.GenerateRequest(prompt="Hello there", params=params), timeout=120))
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        found = _CORE_PID.search(server.log())
        if found is None:
            raise RuntimeError(f"the server's log names no engine-core process:\n{server.log()}")
        rss: int = psutil.Process(int(found.group(1))).memory_info().rss
        return rss, int(info.weight_bytes)
    finally:
        server.terminate()


def measure_rss(
    path: Path, variants: list[Variant], device: str, kv_bytes: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each variant's engine-core RSS over `rounds` servers (variants taking turns), with the median."""
    figures: dict[str, dict[str, Any]] = {v.name: {"rss_bytes_rounds": [], "weight_bytes": 0} for v in variants}
    with tempfile.TemporaryDirectory(prefix="quant-bench-rss-") as log_dir:
        for turn in range(rounds):
            for v in variants:
                rss, weights = engine_rss(path, v, device, kv_bytes, Path(log_dir))
                figures[v.name]["rss_bytes_rounds"].append(rss)
                figures[v.name]["weight_bytes"] = weights
                print(f"  rss round {turn + 1}: {v.name}: engine core {rss / 2**20:.0f} MiB", flush=True)
    for row in figures.values():
        row["rss_bytes"] = statistics.median(row["rss_bytes_rounds"])
    return figures


def rss_markdown(report: dict[str, Any]) -> str:
    """The engine-core RSS table: one row per variant, against fp32 where it was measured."""
    rss = report["engine_rss"]
    base = rss.get("fp32")
    lines = [
        f"Engine-core process RSS, served with --kv-cache-bytes {report['rss_kv_bytes']} "
        f"(the median of {report['rss_rounds']} servers per variant, taken in turn):",
        "",
        "| variant | weights MiB (ModelInfo) | engine RSS MiB | vs fp32 | rounds MiB |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in rss.items():
        ratio = f"{row['rss_bytes'] / base['rss_bytes']:.2f}x" if base else "-"
        rounds = ", ".join(f"{b / 2**20:.0f}" for b in row["rss_bytes_rounds"])
        lines.append(
            f"| {name} | {row['weight_bytes'] / 2**20:.0f} | {row['rss_bytes'] / 2**20:.0f} | {ratio} | {rounds} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    batches = report["batches"]
    lines = [
        *harness.header(report["title"], report, *report["details"]),
        "| variant | weights MiB | vs fp32 | "
        + " | ".join(f"decode tok/s B={b} | vs fp32 | vs bf16" for b in batches)
        + f" | greedy agreement with {report['reference']}: position / prefix / top-1 |",
        "|---|---:|---:|" + "---:|---:|---:|" * len(batches) + "---|",
    ]
    rows = {row["name"]: row for row in report["variants"]}
    fp32, bf16 = rows.get("fp32"), rows.get("bf16")
    for row in report["variants"]:
        cells = [row["name"], f"{row['weights_bytes'] / 2**20:.0f}"]
        cells.append(f"{row['weights_bytes'] / fp32['weights_bytes']:.2f}x" if fp32 else "-")
        for b in batches:
            speed = row["decode_tok_per_s"][str(b)]
            cells.append(f"{speed:.1f}")
            for base in (fp32, bf16):
                cells.append(f"{speed / base['decode_tok_per_s'][str(b)]:.2f}x" if base else "-")
        agree = row["agreement"]
        cells.append(
            "(reference)"
            if row["name"] == report["reference"]
            else f"{100 * agree['position']:.1f}% / {agree['prefix']:.1f} / {100 * agree['top1']:.1f}%"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype-variants",
        nargs="+",
        default=["float32", "bfloat16"],
        help="the unquantised dtypes, each also run with int8 linear layers; the agreement reference is float32 "
        "where listed, else the first",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per row before decode is timed")
    parser.add_argument("--steps", type=int, default=7, help="engine steps timed per measurement (median)")
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes (median)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rss-rounds", type=int, default=3, help="servers per variant for engine RSS (0: none)")
    parser.add_argument("--kv-cache-bytes", type=int, default=RSS_KV_BYTES, help="the RSS servers' KV pool")
    parser.add_argument("--only-rss", action="store_true", help="measure engine RSS only (no decode, no agreement)")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    from tokenizers import Tokenizer

    from modelserve.config import Config
    from modelserve.models.quantize import weight_bytes
    from modelserve.server.lifecycle import load

    torch.set_num_threads(os.cpu_count() or 1)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    variants = [Variant(short[d], d, "none") for d in ns.dtype_variants]
    variants += [Variant(f"int8 ({short[d]} rest)", d, "int8") for d in ns.dtype_variants]
    path = harness.model_dir(ns.preset, ns.cache_dir)
    rss = measure_rss(path, variants, ns.device, ns.kv_cache_bytes, ns.rss_rounds) if ns.rss_rounds > 0 else {}
    rss_info = {"engine_rss": rss, "rss_kv_bytes": ns.kv_cache_bytes, "rss_rounds": ns.rss_rounds}
    if ns.only_rss:
        report = {
            "title": f"INT8 weight-only quantisation, engine-core memory: {ns.preset} on {ns.device}",
            **harness.run_info(ns.device, "bench.quant_bench"),
            **rss_info,
        }
        table = "\n".join(harness.header(report["title"], report)) + "\n" + rss_markdown(report)
        harness.save(f"quant-rss-{ns.preset}-{ns.device}", report, table)
        return
    models = {}
    for v in variants:
        print(f"loading {v.name} ...", flush=True)
        config = Config(model=str(path), device=ns.device, dtype=v.dtype, quantization=v.quantization)
        models[v.name] = load(config).model
    device = next(iter(models.values())).device

    speeds: dict[str, dict[int, list[float]]] = {v.name: {b: [] for b in ns.batch} for v in variants}
    for turn in range(ns.rounds):
        for v in variants:
            for b in ns.batch:
                step_ms = engine_step_ms(models[v.name], b, ns.context, ns.steps, device)
                speeds[v.name][b].append(1e3 * b / step_ms)
            figures = ", ".join(f"B={b} {speeds[v.name][b][-1]:.1f} tok/s" for b in ns.batch)
            print(f"  round {turn + 1}: {v.name}: {figures}", flush=True)

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pool, rng = harness.clean_token_ids(tokenizer), random.Random(3)
    prompts = [harness.make_prompt(tokenizer, pool, rng.randint(16, 64), rng) for _ in range(ns.prompts)]
    reference_name = "fp32" if "float32" in ns.dtype_variants else variants[0].name
    outputs = {v.name: generate_greedy(models[v.name], prompts, ns.new_tokens) for v in variants}
    reference = outputs[reference_name]
    choices = {
        v.name: [greedy_choices(models[v.name], p, r) for p, r in zip(prompts, reference, strict=True)]
        for v in variants
    }
    rows = []
    for v in variants:
        agree = agreement(reference, outputs[v.name], choices[reference_name], choices[v.name])
        rows.append(
            {
                "name": v.name,
                "dtype": v.dtype,
                "quantization": v.quantization,
                "weights_bytes": weight_bytes(models[v.name]),
                "decode_tok_per_s": {str(b): statistics.median(speeds[v.name][b]) for b in ns.batch},
                "decode_tok_per_s_rounds": {str(b): speeds[v.name][b] for b in ns.batch},
                "agreement": agree,
            }
        )
        print(f"  {v.name}: agreement {agree}", flush=True)
    report = {
        "title": f"INT8 weight-only quantisation: {ns.preset} on {ns.device}",
        **harness.run_info(ns.device, "bench.quant_bench"),
        "details": [
            f"decode: B rows after a {ns.context}-token prompt each, B / the median of {ns.steps} engine steps "
            f"(in-process, no server), the median of {ns.rounds} rounds taken in turn",
            "weights: bytes of parameters and buffers; int8 keeps the LM head and embeddings in the rest's dtype",
            f"agreement with {reference_name}: {ns.prompts} prompts (16-64 tokens) x {ns.new_tokens} greedy tokens "
            "through the engine; position = tokens equal at the same place, prefix = mean leading tokens equal, "
            f"top-1 = greedy choice equal along {reference_name}'s own continuation (teacher forcing)",
        ],
        "batches": ns.batch,
        "reference": reference_name,
        "variants": rows,
        **rss_info,
    }
    table = markdown(report) + (f"\n{rss_markdown(report)}" if rss else "")
    harness.save(f"quant-{ns.preset}-{ns.device}", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"quant-{ns.preset}-{ns.device}", table)


if __name__ == "__main__":
    main()
