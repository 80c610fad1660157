"""Decode steps replayed from CUDA graphs: the whole decoder stack in one launch.

A small model's decode step on a GPU is mostly Python launching kernels: a 1B
Llama at batch 32 took 25 ms a step on an H100 while the GPU worked for about
2.5 ms (docs/benchmarks.md). A CUDA graph records the step's kernels once and
replays them with one launch. A graph fixes its shapes and memory addresses, so:

- the live rows are padded up to a bucket (1, 2, 4, 8, then multiples of 8) and
  the attended width up to a power of two (at least COLUMN_QUANTUM), so a few
  graphs cover every step; padded slots get token 0 at position 0 of a free slot
  (KVPool.pad_rows) and their outputs are dropped;
- the inputs are the pool's persistent buffers (next tokens, lengths) and its KV
  tensors, updated in place between replays; a reallocation of the pool (a
  resize, rare) drops every graph, since they hold the old addresses;
- a bucket's graph is captured the first time a step needs it (one warm-up run
  on a side stream, then the capture), into one memory pool all graphs share:
  the first step at a new bucket pays for its capture, later ones replay.

The LM head and sampling stay outside the graph and run on the live rows only.
A model whose logits are more than its LM head's output (a final soft-cap, a
logit scale) is found by a probe at start-up and decoded eagerly instead.

Written here rather than with torch.compile's "reduce-overhead" mode (which also
replays CUDA graphs): it compiles a graph for every new batch and width, costs
minutes of start-up on a transformers model, and breaks its graph at our KV
pool's Python hooks. Recording the eager kernels needs none of that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from modelserve.engine.kv_cache import COLUMN_QUANTUM, ForwardCache, KVPool
from modelserve.engine.masks import DecodeMasks

DecoderStack = Callable[..., object]  # a transformers base model: (input_ids, attention_mask, ...) -> its output
Replay = Callable[[], torch.Tensor]  # runs a recorded step; returns its hidden states [bucket rows, hidden]

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


def batch_bucket(rows: int, slots: int) -> int:
    """The padded row count for `rows` live rows, at most the pool's `slots`."""
    bucket = 1 << max(0, rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
    return min(bucket, slots)


def width_bucket(width: int, columns: int) -> int:
    """The padded attention width for `width` needed columns, at most the pool's `columns`."""
    bucket = max(COLUMN_QUANTUM, 1 << max(0, width - 1).bit_length())
    return min(bucket, columns)


class DecodeGraphs:
    """The decoder stack's decode forward, recorded once per (rows, width) bucket and replayed."""

    def __init__(self, decoder: DecoderStack, cache: ForwardCache, masks: DecodeMasks, device: torch.device) -> None:
        self._decoder = decoder
        self._cache = cache
        self._masks = masks
        self._device = device
        self._replays: dict[tuple[int, int], Replay] = {}
        self._generation = -1  # the pool allocation the recorded graphs point into
        self._memory: _POOL_HANDLE | None = None  # the graphs' shared memory pool, made at the first capture

    @property
    def captured(self) -> int:
        return len(self._replays)

    def hidden_states(self, pool: KVPool) -> torch.Tensor:
        """Run a decode step for the pool's live rows; their last hidden states [rows, hidden]."""
        if pool.generation != self._generation:
            self._replays.clear()
            self._generation = pool.generation
        slots, columns = pool.capacity
        key = (batch_bucket(pool.rows, slots), width_bucket(pool.decode_width(), columns))
        replay = self._replays.get(key)
        pool.pad_rows(key[0])
        if replay is None:
            replay = self._replays[key] = self._record(lambda: self._forward(pool, *key))
        return replay()[: pool.rows]

    def _forward(self, pool: KVPool, rows: int, width: int) -> torch.Tensor:
        input_ids, positions, columns = pool.begin_decode(rows, width)
        self._cache.target = pool
        out = self._decoder(
            input_ids=input_ids,
            attention_mask=self._masks.build(columns, positions),
            position_ids=positions[:, None],
            cache=self._cache,
            use_cache=True,
        )
        hidden: torch.Tensor = out.last_hidden_state[:, -1]  # type: ignore[attr-defined]
        return hidden

    def _record(self, forward: Replay) -> Replay:
        """Capture `forward` into a CUDA graph; return what replays it."""
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            forward()  # warm-up off the graph: lazy initialisation (cuBLAS workspaces, the allocator) happens here
        torch.cuda.current_stream(self._device).wait_stream(side)
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory):
            output = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
