"""The fallback for models whose attention does not go through transformers' AttentionInterface.

A few architectures (Falcon among the tested ones) call SDPA or their own softmax directly, after
their cache's `update()`. For them the step runs the model as loaded, handing it a cache whose
`update()` writes the step's keys and values into their slots and returns every row's whole context
side by side ([1, kv_heads, all rows' context, dim]), with a 4D mask that keeps each token to its own
row's earlier positions. The attention then does more work than the paged one (each token scores
every row's context, masked), which is the price of not touching the model's code; the runner says
at start-up when a model takes this path.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from modelserve.engine.attention import StepContext


class _GatheringLayer(DynamicLayer):  # type: ignore[misc]  # transformers is untyped here
    def __init__(self, cache: GatheringCache, index: int) -> None:
        super().__init__()
        self._cache = cache
        self._index = index
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context, union = self._cache.context, self._cache.union_slots
        k_cache, v_cache = context.keys[self._index], context.values[self._index]
        k_cache.index_copy_(0, context.slot_mapping, key_states[0].transpose(0, 1))
        v_cache.index_copy_(0, context.slot_mapping, value_states[0].transpose(0, 1))
        return k_cache[union].transpose(0, 1)[None], v_cache[union].transpose(0, 1)[None]

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self._cache.union_slots.shape[0]), 0


class GatheringCache(Cache):  # type: ignore[misc]  # transformers is untyped here
    """What one step's forward sees as its cache; `mask()` is the 4D mask to pass with it."""

    def __init__(self, n_layers: int, context: StepContext, union_slots: torch.Tensor) -> None:
        super().__init__(layers=[_GatheringLayer(self, i) for i in range(n_layers)])
        self.context = context
        self.union_slots = union_slots  # [all rows' context] every row's context slots, row after row


def union_mask(
    token_rows: torch.Tensor,
    token_positions: torch.Tensor,
    column_rows: torch.Tensor,
    column_positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[1, 1, tokens, columns] additive: 0 where a token sees a column (its row, at or before it), else the
    dtype's minimum (additive works for SDPA and for an eager softmax alike)."""
    seen = (token_rows[:, None] == column_rows[None, :]) & (column_positions[None, :] <= token_positions[:, None])
    blocked = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return blocked.masked_fill(~seen, torch.finfo(dtype).min)[None, None]
