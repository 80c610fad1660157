"""Prompt chunks in a mixed step (engine/attention.py): each attends to exactly its own row's earlier
positions, whether it starts its row or follows earlier context, checked against one SDPA call in fp32
over the row's whole context with an explicit mask, beside decoding rows and other chunks in the same step
(they share the gather workspace)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytest import MonkeyPatch

from modelserve.engine import attention
from modelserve.engine.attention import PrefillRow, StepContext, Workspace, attend

BLOCK = 16


def _reference(
    query: torch.Tensor, context: StepContext, slots: torch.Tensor, start: int, scale: float | None, window: int | None
) -> torch.Tensor:
    """query [heads, n, dim] at positions start.. over the row's context in `slots` (layer 0's memory, after
    the step wrote it): [n, heads, dim] in fp32."""
    keys, values = context.keys[0][slots].transpose(0, 1), context.values[0][slots].transpose(0, 1)
    n, groups = query.shape[1], query.shape[0] // keys.shape[0]
    positions = torch.arange(start, start + n)[:, None]
    columns = torch.arange(start + n)[None, :]
    seen = columns <= positions
    if window is not None:
        seen = seen & (columns > positions - window)
    k, v = (t.float().repeat_interleave(groups, dim=0) for t in (keys, values))
    out = F.scaled_dot_product_attention(query.float(), k, v, attn_mask=seen, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "scale"), [(4, 4, None, 0.3), (8, 2, None, None), (4, 2, 24, 0.3)]
)
def test_chunks_attend_to_their_own_rows_context(
    heads: int, kv_heads: int, window: int | None, scale: float | None, dtype: torch.dtype, monkeypatch: MonkeyPatch
) -> None:
    """A step of two decoding rows and four chunks: one starting its row, one of a single token, and two after
    earlier context (one not block-aligned, one longer than a flash kernel's block of keys), the rows' blocks
    scattered over the memory, and the step's queries, keys and values token-major views of one projection's
    output, as the forwards hand them over. Without a window, the chunks after earlier context take the
    unmasked path."""
    generator = torch.Generator().manual_seed(heads + kv_heads)
    dim = 16
    chunks = [(0, 20), (37, 1), (21, 9), (1100, 64)]  # (start, length) of each prompt chunk
    decoding = [12, 45]  # context lengths of the decoding rows, their new token included
    lengths = decoding + [start + n for start, n in chunks]
    need = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for count in need:
        tables.append(torch.tensor(order[:count]))
        order = order[count:]
    slots_of = [
        table[torch.arange(n) // BLOCK] * BLOCK + torch.arange(n) % BLOCK
        for table, n in zip(tables, lengths, strict=True)
    ]
    keys = [torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=generator).to(dtype)]
    values = [torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=generator).to(dtype)]

    # the step's tokens: the decoding rows' one each, then every chunk's
    fed = [s[-1:] for s in slots_of[: len(decoding)]] + [
        s[start:] for s, (start, _) in zip(slots_of[len(decoding) :], chunks, strict=True)
    ]
    slot_mapping = torch.cat(fed)
    width = max(decoding)
    gather = torch.stack([F.pad(s, (0, width - s.shape[0])) for s in slots_of[: len(decoding)]])
    prefills, first = [], len(decoding)
    for s, (start, n) in zip(slots_of[len(decoding) :], chunks, strict=True):
        prefills.append(PrefillRow(first, n, start, s))
        first += n
    context = StepContext(
        keys,
        values,
        slot_mapping,
        gather,
        torch.tensor([n - 1 for n in decoding]),
        torch.arange(width),
        prefills,
        Workspace(kv_heads, dim, dtype, torch.device("cpu")),
    )
    tokens = slot_mapping.shape[0]
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    q_size, kv_size = heads * dim, kv_heads * dim
    query = qkv[:, :q_size].view(tokens, heads, dim).transpose(0, 1)  # [heads, tokens, dim], strided
    key = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, dim).transpose(0, 1)
    value = qkv[:, q_size + kv_size :].view(tokens, kv_heads, dim).transpose(0, 1)
    unmasked = []
    continued_chunk = attention._continued_chunk

    def spy(*args: Any) -> torch.Tensor:
        unmasked.append(args[3].start)
        return continued_chunk(*args)

    monkeypatch.setattr(attention, "_continued_chunk", spy)

    out = attend(context, 0, query, key, value, scale, window)

    # A torch whose CPU flash op fails the trial for these grouped heads (torch 2.6 for 4 a kv head) keeps the
    # masked call; the answers below are checked either way.
    flash = window is None and attention._cpu_flash(heads // kv_heads)
    assert unmasked == ([37, 21, 1100] if flash else [])

    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for i, n in enumerate(decoding):
        expected = _reference(query[:, i : i + 1], context, slots_of[i], n - 1, scale, window)
        torch.testing.assert_close(out[i : i + 1].float(), expected, atol=tolerance, rtol=tolerance)
    for row, slots in zip(prefills, slots_of[len(decoding) :], strict=True):
        span = slice(row.first, row.first + row.length)
        expected = _reference(query[:, span], context, slots, row.start, scale, window)
        torch.testing.assert_close(out[span].float(), expected, atol=tolerance, rtol=tolerance)
