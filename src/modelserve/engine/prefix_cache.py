"""The prefix cache: keys and values of prompt blocks already prefilled, reused by prompts that start alike.

Hand-written for the same reason as the KV pool (kv_cache.py): transformers has no cache that outlives a
request or fills our PrefillBuffer, and vLLM's block manager only makes sense with its paged attention.
This is the small way: a prompt splits into full blocks of BLOCK_TOKENS; a block is known by its parent
block and its own token ids, so it matches only where everything before it matched too. The table is a
dict keyed by (parent id, token ids): it hashes the pair and compares it on a hit, so a hash collision can
never hand one prompt another's keys and values.

Copies, not shared memory: a prompt that starts prefilling copies its longest cached run of blocks into
its buffer (one gather per layer) and computes from there; one whose prefill completes copies its new
full blocks out. No request ever holds a cached block, so eviction needs no reference counts, and nothing
a caller does can pin or leak this memory.

Memory: one slab per layer, [blocks, kv_heads, BLOCK_TOKENS, head_dim], taken at start like the pool's
(on a GPU an out-of-memory shows then, not under load) and never grown; the least recently used block goes when
a new one needs a slot. A lookup touches its blocks last to first, so a parent always outlives its
children and eviction never strands a block that could no longer be matched.

Its budget (`budget_tokens`) comes out of the KV budget: PREFIX_CACHE_KV_SHARE of it, but never so much
that the pool could no longer hold one sequence of the model's whole context. So `--kv-cache-bytes` (or
the GPU share) still bounds all KV memory, and turning the cache on never changes which requests can be
served; a budget with no room to spare leaves it off. A share rather than a flag: the right size depends
on the traffic, and a quarter holds many system prompts while costing the batch little.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelserve.config import PREFIX_CACHE_BLOCK_TOKENS, PREFIX_CACHE_KV_SHARE
from modelserve.engine.kv_cache import KVShape, PrefillBuffer

BLOCK_TOKENS = PREFIX_CACHE_BLOCK_TOKENS

_Key = tuple[int, tuple[int, ...]]  # (parent block's id, 0 for the first block; the block's token ids)


def prefix_budget_tokens(kv_budget_tokens: int, max_sequence_length: int) -> int:
    """The prefix cache's share of a KV budget (see the module docstring), in whole blocks."""
    spare = kv_budget_tokens - min(kv_budget_tokens, max_sequence_length)
    tokens = min(int(kv_budget_tokens * PREFIX_CACHE_KV_SHARE), spare)
    return tokens - tokens % BLOCK_TOKENS


@dataclass(slots=True)
class _Block:
    key: _Key
    id: int  # never reused, unlike slots: a child keyed by an evicted parent's id can never match a stranger
    slot: int  # its index in the slabs


class PrefixCache:
    """Full prompt blocks' keys and values, least recently used first out, within `budget_tokens`."""

    def __init__(self, shape: KVShape, budget_tokens: int) -> None:
        self.shape = shape
        self.capacity_blocks = budget_tokens // BLOCK_TOKENS
        self.budget_tokens = self.capacity_blocks * BLOCK_TOKENS
        slab = (self.capacity_blocks, shape.kv_heads, BLOCK_TOKENS, shape.head_dim)
        # empty(), not zeros(): a slot is always written before a lookup can return it.
        self._keys = [torch.empty(slab, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self._values = [torch.empty(slab, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()  # least recently used first
        self._free_slots = list(range(self.capacity_blocks))
        self._ids = itertools.count(1)
        self.hit_tokens = 0  # prompt tokens restored so far, in all

    def tokens_held(self) -> int:
        return len(self._blocks) * BLOCK_TOKENS

    def restore(self, prompt: Sequence[int], buffer: PrefillBuffer) -> int:
        """Copy the longest cached run of `prompt`'s first blocks into `buffer`, which has not started, and
        start it after them; return the tokens restored. The prompt's last token is always left to compute:
        its logits choose the first output token."""
        chain = self._match(prompt, (len(prompt) - 1) // BLOCK_TOKENS)
        if not chain:
            return 0
        self._touch(chain)
        n_tokens = len(chain) * BLOCK_TOKENS
        slots = torch.tensor([block.slot for block in chain], device=self.shape.device)
        for cached, target in ((self._keys, buffer.keys), (self._values, buffer.values)):
            for layer in range(self.shape.n_layers):
                # [blocks, heads, BLOCK_TOKENS, dim] -> [heads, blocks * BLOCK_TOKENS, dim]
                blocks = cached[layer].index_select(0, slots).transpose(0, 1)
                target[layer][0, :, :n_tokens] = blocks.reshape(self.shape.kv_heads, n_tokens, self.shape.head_dim)
        buffer.past = n_tokens
        self.hit_tokens += n_tokens
        return n_tokens

    def insert(self, prompt: Sequence[int], buffer: PrefillBuffer) -> None:
        """Cache `prompt`'s full blocks that are not cached yet, copied out of its completed prefill."""
        chain = self._match(prompt, len(prompt) // BLOCK_TOKENS)
        self._touch(chain)  # its cached ancestors are now the most recent: no eviction below takes them
        first = len(chain)
        # Never more than fit beside those ancestors; evictions then only take blocks outside this prompt.
        new = min(len(prompt) // BLOCK_TOKENS, self.capacity_blocks) - first
        if new <= 0:
            return
        slots = [self._free_slots.pop() if self._free_slots else self._evict() for _ in range(new)]
        try:
            self._copy_in(slots, buffer, first * BLOCK_TOKENS)
        except BaseException:  # nothing half-written is ever listed
            self._free_slots.extend(slots)
            raise
        parent = chain[-1].id if chain else 0
        for i, slot in enumerate(slots, start=first):
            key = (parent, tuple(prompt[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]))
            block = _Block(key, next(self._ids), slot)
            self._blocks[key] = block
            chain.append(block)
            parent = block.id
        self._touch(chain)

    def _copy_in(self, slots: list[int], buffer: PrefillBuffer, start: int) -> None:
        """Copy len(slots) blocks of `buffer`, from column `start` on, into those slots."""
        shape, n = self.shape, len(slots)
        index = torch.tensor(slots, device=shape.device)
        for cached, source in ((self._keys, buffer.keys), (self._values, buffer.values)):
            for layer in range(shape.n_layers):
                # [heads, blocks * BLOCK_TOKENS, dim] -> [blocks, heads, BLOCK_TOKENS, dim]
                columns = source[layer][0, :, start : start + n * BLOCK_TOKENS]
                blocks = columns.reshape(shape.kv_heads, n, BLOCK_TOKENS, shape.head_dim).transpose(0, 1)
                cached[layer].index_copy_(0, index, blocks)

    def _evict(self) -> int:
        """Drop the least recently used block (a leaf: see _touch) and return its slot."""
        return self._blocks.popitem(last=False)[1].slot

    def _match(self, prompt: Sequence[int], max_blocks: int) -> list[_Block]:
        """The cached blocks that begin `prompt`, in order, at most `max_blocks` of them."""
        chain: list[_Block] = []
        parent = 0
        for i in range(max_blocks):
            block = self._blocks.get((parent, tuple(prompt[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Mark a run of blocks most recently used, the first one last: parents outlive their children."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
