"""lm-evaluation-harness scores a loglikelihood task through the server's OpenAI face (local-completions:
token-id prompts, echo, logprobs 1, max_tokens 1) exactly as its own transformers model does on the same
weights (bench/lm_eval_peer.py makes the task; the peer runs from bench/.venv-lmeval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import lm_eval_peer
from tests.conftest import ServerProcess

pytestmark = pytest.mark.skipif(
    not lm_eval_peer.LM_EVAL.exists(),
    reason=f"lm-eval is not installed in {lm_eval_peer.VENV}: `python -m bench.lm_eval_peer --install` makes it",
)


def test_loglikelihoods_through_the_server_equal_lm_evals_own_model(
    llama_server: ServerProcess, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = model_dirs["llama"]
    task = lm_eval_peer.write_task(tmp_path / "task")
    served = lm_eval_peer.evaluate(
        "local-completions",
        f"model={model},base_url=http://127.0.0.1:{llama_server.http_port}/v1/completions,tokenizer={model},"
        "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1",
        task,
        tmp_path / "served",
    )
    own = lm_eval_peer.evaluate("hf", f"pretrained={model},dtype=float32", task, tmp_path / "hf")
    assert served["acc"] == own["acc"]
    assert len(served["samples"]) == len(own["samples"]) == 16
    for ours, theirs in zip(served["samples"], own["samples"], strict=True):
        assert [is_greedy for _, is_greedy in ours] == [is_greedy for _, is_greedy in theirs]
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
