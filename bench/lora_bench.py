"""What serving LoRA adapters costs at 32 streams: the streams spread over four adapters, against the same
engine's streams on the bare base model (issue 20's goal: >= 0.7x the base's throughput).

The engine runs in this process as the server builds it (bench.serving_bench's in-process run), with room
for four adapters (--max-loras 4, --max-lora-rank 16), on a Llama of GPT-2-small's size (12 layers, 768
wide, a 32,000-token vocabulary). The four adapters are written here in PEFT's format with random weights:
rank 16 on all seven linear layers of every decoder layer, the heaviest common LoRA (QLoRA's targets). A
closed loop keeps `--concurrency` streams running, each `--new-tokens` tokens long; in the LoRA arm stream i
runs with adapter i mod 4, so every step mixes all four. The arms alternate within each repeat (base, then
LoRA; then the other order), and the report gives each arm's median output tokens per second and the
LoRA arm's ratio to the base's. The base arm runs an engine without LoRA, on its own copy of the weights; a
third arm runs the LoRA engine with every stream on the base model: what having the slots costs a batch
that uses none (a step with no adapted row skips them).

    python -m bench.lora_bench                 # C=32, 3 repeats
    python -m bench.lora_bench --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

from bench import harness

PRESET = "llama-small"
ADAPTERS = 4
RANK = 16
MODULES = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
ARMS = ("base", "lora", "base-lora-on")
KV_BYTES = 1 << 30  # per engine: 32 streams of prompt and new tokens, with room to spare


def write_adapter(out: Path, config: Any, seed: int) -> Path:
    """A PEFT-format LoRA directory for `config`'s Llama: rank RANK on every linear layer, random A and B."""
    import torch
    from safetensors.torch import save_file

    from modelserve.models.lora import module_shapes

    if (out / "adapter_model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes, tensors = module_shapes(config), {}
    for layer in range(config.num_hidden_layers):
        for block, modules in MODULES.items():
            for module in modules:
                fan_in, fan_out = shapes[module]
                key = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) / RANK
    save_file(tensors, str(out / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": [m for modules in MODULES.values() for m in modules],
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(settings))
    return out


async def arm(engine: Any, name: str, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict[str, Any]:
    """One arm's closed loop over `prompts` (the lora arm's stream i on adapter i mod ADAPTERS): output tokens
    per second."""
    from modelserve.engine.request import Request, SamplingParams

    requests = [
        Request(
            f"{name}-{i}",
            tuple(prompt),
            SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True),
            lora=f"adapter-{i % ADAPTERS}" if name == "lora" else "",
        )
        for i, prompt in enumerate(prompts)
    ]
    tokens, wall = await harness.engine_closed_loop(engine, requests, concurrency)
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall}


async def run(ns: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    from modelserve.config import Config
    from modelserve.models.lora import lora_target, read_adapter
    from modelserve.server.lifecycle import build_engine, load

    base = Config(model=str(path), dtype=ns.dtype, max_batch_size=ns.concurrency, kv_cache_bytes=KV_BYTES)
    with_lora = dataclasses.replace(base, enable_lora=True, max_loras=ADAPTERS, max_lora_rank=RANK)
    bare, loaded = load(base), load(with_lora)  # each engine packs its own copy of the weights
    target = lora_target(loaded.model.config)
    assert target is not None
    adapters = []
    for i in range(ADAPTERS):
        directory = write_adapter(ns.cache_dir / f"{PRESET}-lora-{i}", loaded.model.config, i)
        adapters.append(read_adapter(f"adapter-{i}", str(directory), target, RANK))
    prompts = [loaded.encode(f"Request {i}: tell a long story about the sea.") for i in range(2 * ns.concurrency)]
    engines = {"base": build_engine(base, bare), "lora": build_engine(with_lora, loaded)}
    loop = asyncio.get_running_loop()
    for engine in engines.values():
        engine.start(loop)
    for adapter in adapters:
        engines["lora"].add_lora(adapter)
    try:
        for name, engine in (("base", engines["base"]), ("lora", engines["lora"])):  # warm-up: kernels, slots
            await arm(engine, name, prompts[: 2 * ADAPTERS], 2 * ADAPTERS, 8)
        return await harness.alternate(
            ARMS,
            ns.repeats,
            lambda name: arm(
                engines["base" if name == "base" else "lora"], name, prompts, ns.concurrency, ns.new_tokens
            ),
        )
    finally:
        for engine in engines.values():
            engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    runs = asyncio.run(run(ns, harness.model_dir(PRESET, ns.cache_dir)))
    medians = harness.medians(runs, ARMS)
    report: dict[str, Any] = {
        "title": f"LoRA adapters at {ns.concurrency} streams: {PRESET}, {ns.dtype}, engine in-process",
        **harness.run_info("cpu", "bench.lora_bench"),
        "runs": runs,
        "medians": medians,
    }
    lines = [
        *harness.header(
            report["title"],
            report,
            f"workload: {2 * ns.concurrency} requests per arm in a closed loop of {ns.concurrency}, sampled "
            f"(temperature 1), {ns.new_tokens} tokens each, EOS ignored; {ADAPTERS} adapters of rank {RANK} on "
            f"all seven linear layers, stream i on adapter i mod {ADAPTERS}; arms alternate in each of "
            f"{ns.repeats} repeats; medians",
        ),
        "| arm | output tok/s (median) | over base | goal |",
        "|---|---:|---:|---|",
    ]
    goals = {"lora": 0.7}
    for name in ARMS:
        ratio = medians[name] / medians["base"]
        lines.append(f"| {name} | {medians[name]:.1f} | {ratio:.2f}x | {harness.goal_cell(ratio, goals.get(name))} |")
    table = "\n".join(lines) + "\n"
    harness.save("lora-cost", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", "lora-cost", table)


if __name__ == "__main__":
    main()
