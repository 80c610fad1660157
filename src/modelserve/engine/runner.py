"""The compute: prefill one prompt, decode one token for every running row.

Plain transformers forward passes with a DynamicCache; positions come from each
row's own length so left padding does not shift them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from modelserve.engine.kv_cache import BatchKVCache


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt; return the next-token logits [vocab] and its cache."""
        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], cache

    @torch.inference_mode()
    def decode(self, batch: BatchKVCache, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Feed each row its last token at its own position; return logits [rows, vocab]."""
        out = self.model(
            input_ids=torch.tensor(token_ids, device=self.device)[:, None],
            attention_mask=batch.attention_mask(1, self.device),
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            cache=batch.cache,
            use_cache=True,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits
