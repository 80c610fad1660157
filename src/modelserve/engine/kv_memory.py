"""The KV memory's tensors: one slot per token, `block_size` consecutive slots a block, per layer.

Taken whole at start-up (as vLLM does): no allocation in steady state, and an out-of-memory shows at
start, not under load. Which block holds what is the block manager's business (block_manager.py);
these tensors are the runner's, and nothing else touches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelserve.engine.attention import Workspace


@dataclass(frozen=True)
class KVShape:
    """Per-token KV geometry of a model, read from one probe forward."""

    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class KVMemory:
    """keys[layer] and values[layer]: [(num_blocks + 1) * block_size, kv_heads, head_dim]. The extra block is
    no block manager's: padded rows of a CUDA graph's step write and read its first slot, `pad_slot`."""

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_slot = num_blocks * block_size
        slots = ((num_blocks + 1) * block_size, shape.kv_heads, shape.head_dim)
        # Zeros, not empty(): padded columns of a gather are multiplied before they are masked, and garbage
        # could be NaN.
        self.keys = [torch.zeros(slots, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self.values = [torch.zeros(slots, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self.workspace = Workspace(shape.kv_heads, shape.head_dim, shape.dtype, shape.device)
