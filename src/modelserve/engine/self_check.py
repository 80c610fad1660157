"""A greedy self-check against transformers' generate(), for architectures the suite does not test.

The engine drives a model through its own KV memory, masks and positions; an
architecture that does something the engine does not expect could decode wrong
tokens without failing. So before a model outside capability.FAMILIES serves,
two prompts of different lengths are decoded together by the engine core and
each alone by generate(), and the server refuses to start unless the greedy
tokens agree. It costs two short generate() calls and a few engine steps at
start-up (about a second for a 1B model on a CPU, well under one on a GPU). It
does not reach past a sliding window of the usual size (thousands of tokens):
that case is covered by the families the suite tests, which share transformers'
attention code with the untested ones.
"""

from __future__ import annotations

import time

import torch

from modelserve.engine.core import EngineCore
from modelserve.engine.protocol import AddRequest
from modelserve.engine.request import Request, SamplingParams

NEW_TOKENS = 8


class SelfCheckError(RuntimeError):
    """The engine's greedy tokens differ from generate()'s: serving would give wrong answers."""


@torch.inference_mode()
def check_greedy_matches_generate(core: EngineCore, architecture: str) -> float:
    """Raise SelfCheckError unless the core decodes as generate() does; return the seconds it took."""
    started = time.perf_counter()
    model = core.runner.model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    prompts = [[(11 * i + 7) % vocab for i in range(n)] for n in (13, 5)]
    for key, prompt in enumerate(prompts, start=1):
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        core.apply(AddRequest(key, Request(f"self-check-{key}", tuple(prompt), params)))
    ours: dict[int, list[int]] = {1: [], 2: []}
    while core.has_work():
        for row in core.step().rows:
            if row.token_id >= 0:
                ours[row.key].append(row.token_id)
    for key, prompt in enumerate(prompts, start=1):
        ids = torch.tensor([prompt], device=core.runner.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        expected = out[0, len(prompt) :].tolist()
        if ours[key] != expected:
            raise SelfCheckError(
                f"{architecture} is not served: the engine's greedy tokens {ours[key]} differ from transformers' "
                f"generate() {expected} for a {len(prompt)}-token prompt; this architecture needs engine support"
            )
    return time.perf_counter() - started
