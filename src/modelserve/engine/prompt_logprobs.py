"""Log-probabilities of a prompt's own tokens: vLLM's `prompt_logprobs`, OpenAI's `echo` with `logprobs`
(what lm-evaluation-harness's loglikelihood tasks send).

Prompt token p+1's log-probability is read from the logits at position p, so a request that asks for them
has every prompt position computed by its own forward (none from the prefix cache) and its prompt chunks
keep the logits of those positions, not only of the last one. The values are the raw model's
log-softmax, as a plain forward gives them (no temperature, penalty or bias). The runner scores in
slices, so a long chunk never holds [chunk, vocab] float32 log-probabilities at once.
"""

from __future__ import annotations

import torch

from modelserve.engine.step_plan import PromptScores

SLICE_TOKENS = 256  # positions whose log-softmax is taken at once


def score(logits: torch.Tensor, targets: list[int], top: int) -> PromptScores:
    """The log-probability and rank of each `targets[i]` under `logits[i]` ([len(targets), vocab]), and the
    `top` likeliest tokens of each row; one device-to-host copy."""
    columns: list[torch.Tensor] = []
    target_ids = torch.tensor(targets, device=logits.device)[:, None]
    for start in range(0, len(targets), SLICE_TOKENS):
        logprobs = torch.log_softmax(logits[start : start + SLICE_TOKENS].float(), dim=-1)
        chosen = logprobs.gather(1, target_ids[start : start + SLICE_TOKENS])
        rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
        parts = [chosen.double(), rank.double()]
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            parts += [ids.double(), values.double()]
        columns.append(torch.cat(parts, dim=1))
    host = torch.cat(columns).tolist()
    return PromptScores(
        [row[0] for row in host],
        [int(row[1]) for row in host],
        [[int(t) for t in row[2 : 2 + top]] for row in host],
        [row[2 + top :] for row in host],
    )
