"""lm-evaluation-harness as a peer: its loglikelihood tasks scored through modelserve's OpenAI face
(`local-completions`: token-id prompts, `echo` and `logprobs`) and by its own `hf` model on the same weights.

Why: evaluation harnesses score a text by the log-probabilities of its tokens; served by modelserve they
must be what a plain forward gives. The task is written here (a JSON lines file and its YAML, a multiple
choice over random words), so nothing comes from the hub.

lm-eval lives in its own environment, bench/.venv-lmeval (its datasets, accelerate and tenacity pins stay
out of ours), made with `--install`, or by `make test`'s test tools when pip can reach an index; without it
tests/test_lm_eval.py skips and says so.

    python -m bench.lm_eval_peer --install      # once (a few minutes: torch, lm-eval[hf,api])
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import harness

VENV = harness.ROOT / "bench" / ".venv-lmeval"
LM_EVAL = VENV / "bin" / "lm_eval"
LM_EVAL_SPEC = "lm-eval[hf,api]==0.4.13"
TORCH_SPEC = "torch==2.13.0"  # the CPU wheel, as the Makefile's TORCH_SPEC
TRANSFORMERS_SPEC = "transformers==5.24.0"  # the one modelserve is tested with (constraints.txt)
TASK = "modelserve_mc"
WORDS = ("cat", "dog", "red", "blue", "sun", "moon", "tree", "river", "stone", "bird", "wind", "salt")


def install() -> None:
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    python = str(VENV / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", TORCH_SPEC, TRANSFORMERS_SPEC, LM_EVAL_SPEC], check=True)


def write_task(folder: Path, docs: int = 16, seed: int = 0) -> Path:
    """A multiple-choice loglikelihood task over random words, in `folder`; returns its include path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    with data.open("w") as out:
        for _ in range(docs):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
            choices = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
            out.write(json.dumps({"question": question, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def evaluate(model: str, model_args: str, task_dir: Path, out_dir: Path, timeout_s: float = 600) -> dict[str, Any]:
    """Run lm_eval on the task; returns {"acc": ..., "samples": [[loglikelihood, is_greedy] per choice]...}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(LM_EVAL), "--model", model, "--model_args", model_args, "--tasks", TASK]
    command += ["--include_path", str(task_dir), "--output_path", str(out_dir), "--log_samples"]
    if model == "hf":
        command += ["--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"lm_eval {model} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(Path(sorted(glob.glob(f"{out_dir}/*/results_*.json"))[-1]).read_text())
    samples_file = sorted(glob.glob(f"{out_dir}/*/samples_{TASK}_*.jsonl"))[-1]
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return {
        "acc": results["results"][TASK]["acc,none"],
        "samples": [[[float(ll), is_greedy == "True"] for ll, is_greedy in s["filtered_resps"]] for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help=f"make {VENV} with {LM_EVAL_SPEC}")
    ns = parser.parse_args()
    if ns.install:
        install()
        print(f"lm_eval is at {LM_EVAL}")


if __name__ == "__main__":
    main()
