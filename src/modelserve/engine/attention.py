"""Attention over paged KV memory, for a step that mixes prompt chunks and decoding rows in one forward.

The step's tokens are one flat sequence ([1, tokens]); each layer writes its new keys and values into
their slots (a block's `block_size` slots per block, so token p of a row is in slot
`table[p // block_size] * block_size + p % block_size`), then every row attends to its own positions:

- rows feeding one token (decoding) together: on a CPU, one call of the paged decode kernel
  (paged_decode_cpu.py) reads their context in place; elsewhere (or without the kernel) their
  context's slots are gathered into one padded batch and one SDPA call covers them all, with a
  padding mask (and the sliding window, if any);
- each prompt chunk on its own: SDPA, causal from its start, over its gathered context; a chunk that
  starts its row reads the step's own keys and values, nothing gathered. On a CPU a chunk after earlier
  context runs as two flash calls with no mask, one over the gathered earlier context and one causal over
  its own keys, merged by their log-sum-exps (`_continued_chunk`).

What a step shares across layers (slots, gather indices, masks) is built once per step, in
`StepContext`, from the runner's input tensors. Soft-capped attention (Gemma 2) runs the same gathers
through a plain softmax (the kernel caps in place).

transformers models reach it through their AttentionInterface (`PAGED_ATTENTION`); the runner turns it
on only around its own forwards, so the same model object still runs generate() as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from modelserve.engine.lora import LoraBatch

PAGED_ATTENTION = "modelserve_paged"

_local = threading.local()


class Workspace:
    """Buffers kept for the gathered context of a step's rows, reused by every layer and step: a fresh
    tensor of tens of MB per gather costs its page faults each time (a gpt2-small batch-32 gather of 256
    tokens a row: 4.0 ms into a new tensor, 1.2 ms into a kept one, on this machine's CPU)."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self._shape = (kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self._keys = self._values = torch.empty(0, kv_heads, head_dim, dtype=dtype, device=device)

    def buffers(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers [slots, kv_heads, head_dim] (growing them when too small)."""
        if self._keys.shape[0] < slots:
            self._keys = torch.empty(slots, *self._shape, dtype=self._dtype, device=self._device)
            self._values = torch.empty(slots, *self._shape, dtype=self._dtype, device=self._device)
        return self._keys[:slots], self._values[:slots]


@dataclass
class PrefillRow:
    """One prompt chunk: its tokens' range in the step, and its context's slots."""

    first: int  # index of its first token in the step
    length: int  # tokens fed
    start: int  # position of its first token
    slots: torch.Tensor  # [start + length] the slots of its whole context


@dataclass
class StepContext:
    """Where this step's keys and values go and what each row reads, shared by every layer."""

    keys: list[torch.Tensor]  # per layer [slots, kv_heads, head_dim]
    values: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [tokens] where each fed token's keys and values are written
    decode_gather: torch.Tensor | None  # [decoding rows, width] context slots, padded; those rows feed the
    # step's first tokens, one each
    decode_positions: torch.Tensor | None  # [decoding rows] each row's position
    decode_columns: torch.Tensor | None  # [width]
    prefills: list[PrefillRow]
    workspace: Workspace
    decode_kernel: bool = False  # decoding rows go through torch.ops.modelserve.paged_decode (CPU)
    lora: LoraBatch | None = None  # the step's LoRA adapters, per token (engine/lora.py); None: no adapted row
    calls: int = 0  # layers that ran the paged attention in this context (start-up checks it is every one)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[rows, 1, 1, width]: the columns each decoding row sees (its context, within its window)."""
        mask = self._masks.get(window)
        if mask is None:
            assert self.decode_positions is not None and self.decode_columns is not None
            columns, positions = self.decode_columns[None, :], self.decode_positions[:, None]
            seen = columns <= positions
            if window is not None:
                seen = seen & (columns > positions - window)
            mask = self._masks[window] = seen[:, None, None, :]
        return mask


def current() -> StepContext | None:
    context: StepContext | None = getattr(_local, "context", None)
    return context


@contextmanager
def step_context(context: StepContext) -> Iterator[None]:
    """Make `context` the one attention reads during a forward. Its masks are built anew in each forward
    (the first layer that needs one builds it), so a recorded CUDA graph recomputes them on replay."""
    context._masks.clear()
    _local.context = context
    try:
        yield
    finally:
        _local.context = None


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, tokens, dim], key and value
    [1, kv_heads, tokens, dim] for the step's new tokens; returns [1, tokens, heads, dim]."""
    context = current()
    if context is None:
        raise RuntimeError("paged attention called outside an engine step")
    layer: int = module.layer_idx  # type: ignore[assignment]  # every attention module transformers has sets it
    context.calls += 1
    out = attend(context, layer, query[0], key[0], value[0], scaling, sliding_window, softcap)
    return out[None], None


def attend(
    context: StepContext,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write `key`/`value` [kv_heads, tokens, dim] into the layer's slots, then attend `query` [heads, tokens,
    dim] for every row; returns [tokens, heads, dim]."""
    k_cache, v_cache = context.keys[layer], context.values[layer]
    k_cache.index_copy_(0, context.slot_mapping, key.transpose(0, 1))
    v_cache.index_copy_(0, context.slot_mapping, value.transpose(0, 1))
    heads, tokens = query.shape[:2]
    out = query.new_empty(tokens, heads, value.shape[-1])
    if context.decode_gather is not None:
        rows = context.decode_gather.shape[0]
        if context.decode_kernel:
            assert context.decode_positions is not None
            q = query[:, :rows].transpose(0, 1)  # [rows, heads, dim]
            out[:rows] = torch.ops.modelserve.paged_decode(
                q if q.stride(-1) == 1 else q.contiguous(),
                k_cache,
                v_cache,
                context.decode_gather,
                context.decode_positions,
                window or 0,
                scaling if scaling is not None else query.shape[-1] ** -0.5,
                softcap or 0.0,
            )
        else:
            q = query[:, :rows].transpose(0, 1)[:, :, None, :]  # [rows, heads, 1, dim]
            k, v = _gather(context, k_cache, v_cache, context.decode_gather)  # [rows, kv_heads, width, dim]
            o = _sdpa(q, k, v, context.decode_mask(window), scaling, softcap)  # [rows, heads, 1, dim]
            out[:rows] = o[:, :, 0]
    unmasked = window is None and softcap is None and query.device.type == "cpu"
    unmasked = unmasked and bool(context.prefills) and _cpu_flash(query.shape[0] // key.shape[0])
    for row in context.prefills:
        chunk = slice(row.first, row.first + row.length)
        q = query[None, :, chunk]  # [1, heads, n, dim]
        if row.start and unmasked:
            o = _continued_chunk(context, k_cache, v_cache, row, q, key[None, :, chunk], value[None, :, chunk], scaling)
            out[chunk] = o[0].transpose(0, 1)
            continue
        if row.start == 0:  # its whole context is this step's: nothing to gather
            k, v = key[None, :, chunk], value[None, :, chunk]
        else:
            k, v = _gather(context, k_cache, v_cache, row.slots[None])
        mask = None
        if row.start or window is not None:
            positions = torch.arange(row.start, row.start + row.length, device=query.device)[:, None]
            columns = torch.arange(row.start + row.length, device=query.device)[None, :]
            seen = columns <= positions
            if window is not None:
                seen = seen & (columns > positions - window)
            mask = seen[None, None]
        o = _sdpa(q, k, v, mask, scaling, softcap, causal=mask is None)
        out[row.first : row.first + row.length] = o[0].transpose(0, 1)
    return out


def _continued_chunk(
    context: StepContext,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row: PrefillRow,
    q: torch.Tensor,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """A prompt chunk after earlier context, on a CPU, with no mask: flash attention over the earlier
    context (every query sees all of it) and, causally, over the chunk's own keys, merged by the two
    log-sum-exps. One SDPA call with the chunk's [chunk, context] mask builds and converts that mask in
    every layer, and scores the masked upper triangle too (128 queries after 1,920 tokens, 4 heads of
    16, one thread: 1.72 ms a layer against 0.95). Returns [1, heads, n, dim]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q, own_k, own_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, own_k, own_v))
    earlier_k, earlier_v = _gather(context, k_cache, v_cache, row.slots[None, : row.start])
    earlier, earlier_lse = flash(q, earlier_k, earlier_v, scale=scaling)
    own, own_lse = flash(q, own_k, own_v, is_causal=True, scale=scaling)
    earlier_share = torch.sigmoid(earlier_lse - own_lse)[..., None]  # of each query's softmax mass
    merged: torch.Tensor = torch.lerp(own.float(), earlier.float(), earlier_share)
    return merged.to(q.dtype)


@cache
def _cpu_flash(groups: int) -> bool:
    """Does this torch's CPU flash attention op give SDPA's answer, its log-sum-exp included, for `groups`
    query heads a kv head? It is a private op (SDPA's own CPU kernel): older torch lacks it or reads grouped
    heads wrongly, and then chunks keep the masked SDPA call. Tried once, on a small case."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2 * groups, 5, 8, generator=generator)
    k, v = torch.randn(2, 1, 2, 7, 8, generator=generator)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=0.5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.5
    expected = torch.matmul(torch.softmax(scores, dim=-1), v)
    return torch.allclose(out, expected, atol=1e-5) and torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)


def _gather(
    context: StepContext, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] slots -> keys and values [rows, kv_heads, width, dim], in the workspace's buffers."""
    rows, width = slots.shape
    flat = slots.reshape(-1)
    keys, values = context.workspace.buffers(flat.shape[0])
    torch.index_select(k_cache, 0, flat, out=keys)
    torch.index_select(v_cache, 0, flat, out=values)
    return (
        keys.view(rows, width, *k_cache.shape[1:]).transpose(1, 2),
        values.view(rows, width, *v_cache.shape[1:]).transpose(1, 2),
    )


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    causal: bool = False,
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=groups > 1
        )
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        n, width = scores.shape[-2:]
        mask = torch.ones(n, width, dtype=torch.bool, device=q.device).tril(width - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
