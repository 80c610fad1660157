"""The KV memory: a preallocated pool of rows for decoding, and a buffer per prefill.

Hand-written because transformers has no cache that fits continuous batching:
DynamicCache concatenates every step (copying every row's keys and values each
token) and cannot add rows; StaticCache shares one write position across rows.
Here each decoding row owns a slot of a preallocated tensor per layer,
[rows, kv_heads, columns, head_dim], and writes its new token at its own
position, so nothing is copied per step and rows never shift. Tokens sit
right-padded at columns [0, length); the attention mask hides the rest.

Decoding rows stay packed in slots [0, rows): attention reads one slice. A
finished row is replaced by the last one (one row copy). A prompt is prefilled,
in chunks, into its own PrefillBuffer and copied into the next slot when done.

The pool's shape follows the live rows under a fixed token budget: rows times
columns never exceeds `budget_tokens`, so memory does not grow with the number
of requests served. transformers reaches the memory through ForwardCache,
whose layers hand each forward's keys and values to the current target.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer

COLUMN_QUANTUM = 256  # the pool's column count moves in steps of this many tokens


class _Target(Protocol):
    """What one forward pass writes into."""

    past: int  # columns before this forward's tokens (the model derives positions for the mask from it)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class _TargetLayer(DynamicLayer):  # type: ignore[misc]  # transformers is untyped here
    def __init__(self, cache: ForwardCache, index: int, check_mask: bool) -> None:
        super().__init__()
        self._cache = cache
        self._index = index
        self.is_initialized = True
        # transformers checks whether a decode step's padding mask is all ones, to drop it: a read of a device
        # value. On a CPU that is free and the unmasked attention is faster (5-8% of a tiny model's step); on a
        # GPU it is a second host sync every step, and an error inside a CUDA graph's capture. A "compileable"
        # cache tells transformers not to look: the mask is then always passed.
        self.is_compileable = not check_mask

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache.target.write(self._index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._cache.target.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.target.past + query_length, 0


class ForwardCache(Cache):  # type: ignore[misc]  # transformers is untyped here
    """The transformers Cache a forward pass sees; `target` says where its K/V go.

    `check_mask`: let transformers read the padding mask to drop it when all ones (for CPUs only)."""

    def __init__(self, n_layers: int, check_mask: bool) -> None:
        super().__init__(layers=[_TargetLayer(self, i, check_mask) for i in range(n_layers)])
        self.target: _Target = _NoTarget()


class _NoTarget:
    past = 0

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("ForwardCache used without a target")


class KVShape:
    """Per-token KV geometry of a model, read from one probe forward."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def empty(self, rows: int, columns: int, layers: int | None = None) -> list[torch.Tensor]:
        # Zeros, not empty(): masked columns are still multiplied, and garbage could be NaN.
        shape = (rows, self.kv_heads, columns, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers or self.n_layers)]


class PrefillBuffer:
    """One prompt's keys and values while it is prefilled, chunk by chunk."""

    def __init__(self, shape: KVShape, prompt_len: int) -> None:
        self.keys = shape.empty(1, prompt_len)
        self.values = shape.empty(1, prompt_len)
        self.past = 0  # columns already filled
        self._chunk = 0

    def begin(self, n_tokens: int) -> None:
        self._chunk = n_tokens

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.past + self._chunk
        self.keys[layer][:, :, self.past : end] = keys
        self.values[layer][:, :, self.past : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def end(self) -> None:
        self.past += self._chunk
        self._chunk = 0


class KVPool:
    """Keys and values of the decoding rows, packed in slots [0, rows)."""

    def __init__(self, shape: KVShape, budget_tokens: int, max_rows: int, max_columns: int) -> None:
        self.shape = shape
        self.budget_tokens = budget_tokens
        self.max_rows = max_rows
        self.max_columns = min(max_columns, budget_tokens)
        self.lengths: list[int] = []  # tokens held by each live row
        self.needs: list[int] = []  # columns each live row may grow to (prompt + max_new_tokens)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._capacity = (0, 0)  # (rows, columns) allocated
        # The decode step's inputs live on the device and are updated in place, never rebuilt from lists:
        # each row's next input token (the one it sampled last) and its length (= its next position).
        self._next_tokens = torch.zeros(max_rows, dtype=torch.long, device=shape.device)
        self._lengths = torch.zeros(max_rows, dtype=torch.long, device=shape.device)
        self._rows_index = torch.arange(max_rows, device=shape.device)
        self._columns_index = torch.arange(self.max_columns + 1, device=shape.device)
        self.past = 0
        self.generation = 0  # bumped when the KV tensors are reallocated (a CUDA graph holds their addresses)
        self._step_rows = 0  # slots the current decode forward covers (live rows, or a padded bucket of them)
        # Take the whole budget now (as vLLM does): no allocation in steady state, and an
        # out-of-memory shows at start-up, not under load. A request wider than this reshapes it.
        columns = min(self.max_columns, max(COLUMN_QUANTUM, budget_tokens // max_rows))
        if columns > COLUMN_QUANTUM:
            columns -= columns % COLUMN_QUANTUM
        self._resize(min(max_rows, budget_tokens // columns), columns)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        return self._capacity

    def tokens_held(self) -> int:
        return sum(self.lengths)

    def allocated_tokens(self) -> int:
        return self._capacity[0] * self._capacity[1]

    def fits(self, needs: list[int]) -> bool:
        """Could rows with these column needs join the live rows (after a resize if need be)?"""
        return self._plan([*self.needs, *needs]) is not None

    def add(self, buffer: PrefillBuffer, need: int, first_token: torch.Tensor) -> int:
        """Copy a finished prefill into the next slot, with the token it decodes first; return the row."""
        self.reserve([need])
        row, length = self.rows, buffer.past
        for layer in range(self.shape.n_layers):
            self._keys[layer][row, :, :length] = buffer.keys[layer][0, :, :length]
            self._values[layer][row, :, :length] = buffer.values[layer][0, :, :length]
        self.lengths.append(length)
        self.needs.append(need)
        self._lengths[row] = length
        self._next_tokens[row] = first_token
        return row

    def reserve(self, extra_needs: list[int]) -> None:
        """Make room for rows with these needs beside the live ones (resizing when needed)."""
        plan = self._plan([*self.needs, *extra_needs])
        if plan is None:
            raise MemoryError(f"the KV budget of {self.budget_tokens} tokens cannot hold these rows")
        if plan != self._capacity:
            self._resize(*plan)

    def remove(self, row: int) -> None:
        """Free a row; the last row moves into its slot (the scheduler moves its sequence alike)."""
        last = self.rows - 1
        if row != last:
            length = self.lengths[last]
            for tensors in (self._keys, self._values):
                for t in tensors:
                    t[row, :, :length] = t[last, :, :length]
            self.lengths[row], self.needs[row] = self.lengths[last], self.needs[last]
            self._lengths[row] = self._lengths[last]
            self._next_tokens[row] = self._next_tokens[last]
        self.lengths.pop()
        self.needs.pop()

    def clear(self) -> None:
        self.lengths.clear()
        self.needs.clear()

    # ---- one decode forward --------------------------------------------------

    def decode_width(self) -> int:
        """Columns the next decode step attends over: the longest row and its new token."""
        return max(self.lengths) + 1

    def begin_decode(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Set up a decode forward over slots [0, rows) and columns [0, width): (input ids [rows, 1],
        positions [rows], column indices [width]). `rows` and `width` may exceed the live rows and
        `decode_width()` (a CUDA graph's bucket); slots past the live rows must be `pad_rows`' blanks."""
        self._step_rows = rows
        self.past = width - 1
        return self._next_tokens[:rows, None], self._lengths[:rows], self._columns_index[:width]

    def pad_rows(self, rows: int) -> None:
        """Blank slots [live rows, rows) for a padded decode: token 0 at position 0 of a free slot, so their
        writes land where no live row reads and their outputs, which are dropped, stay finite."""
        self._lengths[self.rows : rows] = 0
        self._next_tokens[self.rows : rows] = 0

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = self._step_rows, self.past + 1
        k, v = self._keys[layer], self._values[layer]
        index, positions = self._rows_index[:rows], self._lengths[:rows]
        k[index, :, positions] = keys[:, :, 0]
        v[index, :, positions] = values[:, :, 0]
        return k[:rows, :, :width], v[:rows, :, :width]

    def end_decode(self, next_tokens: torch.Tensor) -> None:
        """The step ran: every row grew by one token, and `next_tokens` [rows] are what they decode next."""
        rows = self.rows
        self.lengths = [n + 1 for n in self.lengths]
        self._lengths[:rows] += 1
        self._next_tokens[:rows] = next_tokens

    # ---- sizing --------------------------------------------------------------

    def _plan(self, needs: list[int]) -> tuple[int, int] | None:
        """The (rows, columns) to hold rows with these needs, or None if the budget cannot."""
        if not needs:
            return self._capacity
        rows_needed, cols_needed = len(needs), max(needs)
        if rows_needed > self.max_rows or cols_needed > self.max_columns:
            return None
        rows_have, cols_have = self._capacity
        if rows_needed <= rows_have and cols_needed <= cols_have:
            return self._capacity
        columns = min(self.max_columns, -(-cols_needed // COLUMN_QUANTUM) * COLUMN_QUANTUM)
        rows = min(self.max_rows, self.budget_tokens // columns)
        if rows < rows_needed:
            columns = cols_needed
            rows = min(self.max_rows, self.budget_tokens // columns)
        return (rows, columns) if rows >= rows_needed else None

    def _resize(self, rows: int, columns: int) -> None:
        """Reshape the pool, one layer at a time so the peak stays near one pool, not two."""
        live, keep = self.rows, min(columns, self._capacity[1])
        first = not self._keys
        for tensors in (self._keys, self._values):
            for layer in range(self.shape.n_layers):
                (new,) = self.shape.empty(rows, columns, layers=1)
                if not first:
                    new[:live, :, :keep] = tensors[layer][:live, :, :keep]
                    tensors[layer] = new
                else:
                    tensors.append(new)
        self._capacity = (rows, columns)
        self.generation += 1
