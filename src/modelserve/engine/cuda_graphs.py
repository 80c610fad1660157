"""Decode-only steps replayed from CUDA graphs: the whole decoder stack in one launch.

A small model's decode step on a GPU is mostly Python launching kernels: a 1B Llama at batch 32 took
25 ms a step on an H100 while the GPU worked for about 2.5 ms (docs/benchmarks.md). A CUDA graph
records the step's kernels once and replays them with one launch. A graph fixes its shapes and memory
addresses, so (the small way, as nano-vllm does):

- the live rows are padded up to a bucket (1, 2, 4, 8, then multiples of 8) and the attended width up
  to a power of two (at least MIN_WIDTH), so a few graphs cover every step; a padded row feeds token 0
  at position 0, writes its keys and values to the KV memory's pad slot (no block holds it), reads
  only that slot, and its output is dropped;
- each graph has its own static inputs (tokens, positions, write slots, the gather of each row's
  context), refilled in place before a replay; the KV memory is allocated once, so its addresses hold;
- a bucket's graph is captured the first time a step needs it (one warm-up run on a side stream, then
  the capture), into one memory pool all graphs share.

The LM head and sampling stay outside the graph and run on the live rows only. A model whose logits
are more than its LM head's output (a final soft-cap, a logit scale) is found by a probe at start-up
and decoded eagerly instead. A capture that fails is logged once and its bucket runs eagerly from
then on: no request fails for it.

Written here rather than with torch.compile's "reduce-overhead" mode (which also replays CUDA graphs):
it compiles a graph for every new batch and width, costs minutes of start-up on a transformers model,
and breaks its graph at the attention's Python. Recording the eager kernels needs none of that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from modelserve.engine.attention import StepContext, Workspace
from modelserve.engine.kv_memory import KVMemory

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

MIN_WIDTH = 256  # the smallest attended width a graph is captured for
Replay = Callable[[], torch.Tensor]  # runs a recorded step; returns its hidden states [bucket rows, hidden]
DecoderForward = Callable[[torch.Tensor, torch.Tensor, StepContext], torch.Tensor]  # ids, positions -> hidden


def batch_bucket(rows: int, max_rows: int) -> int:
    """The padded row count for `rows` live rows, at most `max_rows`."""
    bucket = 1 << max(0, rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
    return min(bucket, max_rows)


def width_bucket(width: int, max_width: int) -> int:
    """The padded attention width for `width` needed columns, at most `max_width`."""
    bucket = max(MIN_WIDTH, 1 << max(0, width - 1).bit_length())
    return min(bucket, max_width)


class _Graph:
    """One bucket: its static inputs, the context attention reads them through, and its replay."""

    def __init__(self, kv: KVMemory, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width, self.pad_slot = rows, width, kv.pad_slot
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), kv.pad_slot, dtype=torch.long, device=device)
        self.gather = torch.full((rows, width), kv.pad_slot, dtype=torch.long, device=device)
        columns = torch.arange(width, device=device)
        # Its own gather buffers, sized for the bucket now: a replay reads and writes the addresses it recorded.
        workspace = Workspace(kv.shape.kv_heads, kv.shape.head_dim, kv.shape.dtype, device)
        workspace.buffers(rows * width)
        self.context = StepContext(kv.keys, kv.values, self.slots, self.gather, self.positions, columns, [], workspace)
        self.replay: Replay | None = None

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, context: StepContext) -> None:
        """Copy a step's live rows in; the rows and columns past them read and write the pad slot."""
        assert context.decode_gather is not None
        live, width = context.decode_gather.shape
        self.input_ids[:live] = input_ids
        self.positions[:live] = positions
        self.slots[:live] = context.slot_mapping
        self.gather[:live, :width] = context.decode_gather
        self.gather[:live, width:] = self.pad_slot  # past a row's position: masked
        self.input_ids[live:] = 0
        self.positions[live:] = 0
        self.slots[live:] = self.pad_slot
        self.gather[live:] = self.pad_slot


class DecodeGraphs:
    """The decoder stack's decode-only forward, recorded once per (rows, width) bucket and replayed."""

    def __init__(self, forward: DecoderForward, kv: KVMemory, max_rows: int, max_width: int) -> None:
        self._forward = forward
        self._kv = kv
        self._max_rows = max_rows
        self._max_width = max_width
        self._device = kv.keys[0].device
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._eager: set[tuple[int, int]] = set()  # buckets whose capture failed: they run eagerly
        self._memory: _POOL_HANDLE | None = None  # the graphs' shared memory pool, made at the first capture

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, context: StepContext
    ) -> torch.Tensor | None:
        """The last hidden states [rows, hidden] of a decode-only step, or None when its bucket runs eagerly."""
        assert context.decode_gather is not None
        rows, width = context.decode_gather.shape
        key = (batch_bucket(rows, self._max_rows), width_bucket(width, self._max_width))
        if key in self._eager or rows > key[0] or width > key[1]:
            return None
        graph = self._graphs.get(key)
        if graph is None:
            graph = _Graph(self._kv, *key, self._device)
            graph.load(input_ids, positions, context)
            try:
                graph.replay = self._record(lambda: self._forward(graph.input_ids, graph.positions, graph.context))
            except Exception:
                self._eager.add(key)
                log.warning(
                    "capturing a CUDA graph for %d rows x %d columns failed; steps of that size run eagerly",
                    *key,
                    exc_info=True,
                )
                return None
            self._graphs[key] = graph
        graph.load(input_ids, positions, context)
        assert graph.replay is not None
        return graph.replay()[:rows]

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
