"""The running batch's key/value memory: one row per sequence, left-padded.

transformers' DynamicCache can drop rows (`batch_select_indices`) but has no way
to add one. Adding a prefilled sequence pads the shorter side on the left and
concatenates along the batch; the attention mask marks the padding so it takes
no part in attention. Columns that every row pads are cut off again, so memory
follows the longest live row, not the history of the batch.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BatchKVCache:
    """Keys and values of the running rows, aligned on a shared column count."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self._pad: list[int] = []  # left padding of each row, in columns

    @property
    def rows(self) -> int:
        return len(self._pad)

    @property
    def width(self) -> int:
        """Columns every row spans (its tokens plus its padding)."""
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def tokens_held(self) -> int:
        """Real (unpadded) token positions held across all rows."""
        return self.rows * self.width - sum(self._pad)

    def add(self, row: DynamicCache) -> None:
        """Append one prefilled sequence (a batch-1 cache) as the last row."""
        row_width = int(row.get_seq_length())
        if self.cache is None:
            self.cache, self._pad = row, [0]
            return
        grow = max(0, row_width - self.width)
        row_pad = max(0, self.width - row_width)
        for mine, theirs in zip(_layers(self.cache), _layers(row), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, row_pad)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, row_pad)], dim=0)
        self._pad = [p + grow for p in self._pad] + [row_pad]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order, and cut padding they all share."""
        if not rows:
            self.cache, self._pad = None, []
            return
        if rows != list(range(self.rows)):
            assert self.cache is not None
            self.cache.batch_select_indices(torch.tensor(rows, device=_layers(self.cache)[0].keys.device))
            self._pad = [self._pad[i] for i in rows]
        shared = min(self._pad)
        if shared:
            assert self.cache is not None
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, shared:]
                layer.values = layer.values[:, :, shared:]
            self._pad = [p - shared for p in self._pad]

    def attention_mask(self, new_columns: int, device: torch.device) -> torch.Tensor:
        """[rows, width + new_columns] mask: 0 on padding, 1 on tokens."""
        cols = torch.arange(self.width + new_columns, device=device)
        pad = torch.tensor(self._pad, device=device)
        return (cols[None, :] >= pad[:, None]).long()


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    if not all(type(layer) is DynamicLayer for layer in layers):
        raise TypeError("only full-attention DynamicLayer caches can be batched (no sliding window)")
    return list(layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, n, 0))
