"""Which columns each decoding row attends to, sliding windows included.

Rows of a decode step sit at their own positions, right-padded in the KV pool.
For full attention a 2D padding mask says it all, and transformers builds the
rest. A sliding window cannot be said that way: transformers places the window
at the step's common query position (the longest row's), so a shorter row would
lose the start of its window and decode wrong tokens once it outgrows it. Models
with sliding layers therefore get the 4D masks built here, per row: one per
layer kind (a dict, which models that mix full and sliding layers, like Gemma
2/3, accept in place of their own) or the one their layers share.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

DecodeMask = torch.Tensor | dict[str, torch.Tensor]


def layer_kinds(config: Any) -> list[str]:
    """Each layer's attention kind: "full_attention" or "sliding_attention" (or what the config says)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and getattr(config, "use_sliding_window", True) is not False
    return ["sliding_attention" if sliding else "full_attention"] * int(config.num_hidden_layers)


class DecodeMasks:
    """Builds a decode step's attention mask argument for one model."""

    def __init__(self, kinds: frozenset[str], window: int | None, additive: torch.dtype | None) -> None:
        self.kinds = kinds
        self.window = window
        self.additive = additive  # eager attention adds a float mask to its scores; SDPA takes booleans

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> DecodeMasks:
        config = model.config
        kinds = frozenset(layer_kinds(config))
        additive = model.dtype if config._attn_implementation == "eager" else None
        return cls(kinds, getattr(config, "sliding_window", None), additive)

    def build(self, columns: torch.Tensor, positions: torch.Tensor) -> DecodeMask:
        """The mask for rows at `positions` [rows] over `columns` [width] (tensor ops only: no host reads)."""
        visible = columns[None, :] <= positions[:, None]
        if self.kinds == {"full_attention"}:
            return visible.long()  # a 2D padding mask: transformers builds the 4D one
        masks: dict[str, torch.Tensor] = {}
        for kind in self.kinds:
            seen = visible
            if kind == "sliding_attention":
                assert self.window is not None
                seen = visible & (columns[None, :] > positions[:, None] - self.window)
            masks[kind] = self._as_input(seen[:, None, None, :])
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _as_input(self, seen: torch.Tensor) -> torch.Tensor:
        if self.additive is None:
            return seen
        blocked = torch.zeros(seen.shape, dtype=self.additive, device=seen.device)
        return blocked.masked_fill(~seen, torch.finfo(self.additive).min)
