"""What per-row sampling work costs at 32 streams: every stream with a JSON schema, or with presence and
frequency penalties, against the same engine and streams without them (issue 18's goal: each >= 0.8x).

The engine runs in this process as the server builds it (bench.serving_bench's in-process run), on the
preset's model with a byte-level BPE tokenizer of its whole vocabulary (GPT-2's 50,257 for gpt2-small),
trained here once on the Python sources of this environment (`bpe_model_dir`): a grammar's mask is then
computed over as many tokens, merged as a real tokenizer merges them (`{"`, `":`). A closed loop keeps
`--concurrency` streams running; the arms alternate within each repeat (plain, schema, penalties, then the
next repeat in another order), and the report gives each arm's median output tokens per second and its
ratio to the plain arm's median. Every stream generates `--new-tokens` tokens: the schema's notes field
is longer than that, so its answers are still open at the limit (the table says how many tokens a request
got, per arm).

    python -m bench.sampling_cost_bench                 # gpt2-small fp32, C=32, 3 repeats
    python -m bench.sampling_cost_bench --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from bench import harness

CORPUS_BYTES = 24 << 20  # of Python source, enough for 50k merges

# Nested, with enums, arrays and required fields; long enough (notes, tags) that a random model's answer is
# still open at the token limit, so every arm generates the same number of tokens, each one constrained.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"type": "string", "enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "notes": {"type": "string", "minLength": 100, "maxLength": 400},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
        },
    },
    "required": ["name", "kind", "age", "notes", "tags", "owner"],
    "additionalProperties": False,
}
ARMS = ("plain", "json_schema", "penalties")


async def arm(engine: Any, name: str, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict[str, Any]:
    """One arm's closed loop over `prompts`: output tokens per second, and how many of them."""
    from modelserve.engine.grammar import grammar_for
    from modelserve.engine.request import Request, SamplingParams

    grammar = grammar_for("json_schema", json.dumps(SCHEMA)) if name == "json_schema" else ""
    penalty = 0.5 if name == "penalties" else 0.0
    params = [
        SamplingParams(
            max_new_tokens=new_tokens,
            temperature=1.0,
            seed=i,
            ignore_eos=not grammar,  # the schema's arm may end only where its JSON could
            presence_penalty=penalty,
            frequency_penalty=penalty,
            grammar=grammar,
        )
        for i in range(len(prompts))
    ]
    requests = [Request(f"{name}-{i}", tuple(prompt), params[i]) for i, prompt in enumerate(prompts)]
    tokens, wall = await harness.engine_closed_loop(engine, requests, concurrency)
    return {"tokens": tokens, "tokens_per_request": tokens / len(prompts), "wall_s": wall, "tok_per_s": tokens / wall}


async def run(ns: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    from modelserve.config import Config
    from modelserve.server.lifecycle import build_engine, load

    config = Config(model=str(path), dtype=ns.dtype, max_batch_size=ns.concurrency)
    loaded = load(config)
    engine = build_engine(config, loaded)
    engine.start(asyncio.get_running_loop())
    prompts = [loaded.encode(f"Record {i}: a pet and its owner, as JSON.") for i in range(2 * ns.concurrency)]
    try:
        await arm(engine, "json_schema", prompts[:4], 4, 8)  # warm-up: the grammar's matcher, the kernels
        return await harness.alternate(
            ARMS, ns.repeats, lambda name: arm(engine, name, prompts, ns.concurrency, ns.new_tokens)
        )
    finally:
        engine.shutdown()


def bpe_model_dir(preset: str, cache_dir: Path) -> Path:
    """The preset's model (its shape, seed and weights) with a byte-level BPE tokenizer of its whole vocabulary,
    trained on this environment's Python sources (sorted, so every machine with the same packages agrees)."""
    import sysconfig

    from modelserve.models.random_init import build_random_model, build_tokenizer

    path = cache_dir / f"bench-{preset}-bpe"
    if (path / "config.json").exists():
        return path
    spec: dict[str, Any] = {"seed": 0, **harness.PRESETS[preset]}
    arch = spec.pop("arch")
    vocab = int(spec.get("vocab_size") or 1024)
    print(f"training a {vocab}-token byte-level BPE for {preset} into {path} (once, a minute or two) ...", flush=True)

    def corpus() -> Any:
        seen = 0
        for source in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            text = source.read_text(errors="replace")
            yield text
            seen += len(text)
            if seen > CORPUS_BYTES:
                return

    tokenizer = build_tokenizer(vocab, corpus())
    spec["vocab_size"] = vocab
    return build_random_model(path, arch, tokenizer=tokenizer, **spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(harness.PRESETS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request in the fixed-length arms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    parser.add_argument("--cache-dir", type=Path, default=harness.CACHE_DIR)
    ns = parser.parse_args()

    runs = asyncio.run(run(ns, bpe_model_dir(ns.preset, ns.cache_dir)))
    medians = harness.medians(runs, ARMS)
    report: dict[str, Any] = {
        "title": f"Sampling work at {ns.concurrency} streams: {ns.preset}, {ns.dtype}, engine in-process",
        **harness.run_info("cpu", "bench.sampling_cost_bench"),
        "runs": runs,
        "medians": medians,
    }
    lines = [
        *harness.header(
            report["title"],
            report,
            f"workload: {2 * ns.concurrency} requests per arm in a closed loop of {ns.concurrency}, sampled "
            f"(temperature 1), {ns.new_tokens} tokens each (plain and penalties with EOS ignored; json_schema's "
            f"answers still open at the limit); arms alternate in each of {ns.repeats} repeats; medians",
        ),
        "| arm | output tok/s (median) | tokens per request | over plain | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ARMS:
        ratio = medians[name] / medians["plain"]
        per_request = harness.medians(runs, (name,), "tokens_per_request")[name]
        goal = harness.goal_cell(ratio, None if name == "plain" else 0.8)
        lines.append(f"| {name} | {medians[name]:.1f} | {per_request:.1f} | {ratio:.2f}x | {goal} |")
    table = "\n".join(lines) + "\n"
    harness.save(f"sampling-cost-{ns.preset}", report, table)
    if ns.write_docs:
        harness.write_docs("benchmarks.md", f"sampling-cost-{ns.preset}", table)


if __name__ == "__main__":
    main()
