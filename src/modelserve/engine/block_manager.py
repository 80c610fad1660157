"""Paged KV memory, as bookkeeping: fixed-size blocks, reference counts, and the prefix cache.

The runner owns the KV tensors (one slot per token, `block_size` slots a block); this module only
decides which block holds which tokens, so it is plain Python and a step plan can name blocks by id.

The prefix cache is the same blocks. A full block is known by a key that chains its parent's key and
its own token ids; a prompt whose first blocks match shares them (its block table points at them and
their reference count goes up): nothing is copied. A block whose last holder ends goes back to the
free list but keeps its key, so a later prompt can still find it, until the block is taken for new
tokens: the free list is least recently freed first, and a sequence frees its last blocks first, so a
prefix outlives its continuations. Every lookup compares the tokens as well as the key, so a hash
collision can never hand one prompt another's keys and values.

Hand-written after nano-vllm's BlockManager (a few dozen lines there too): vLLM's own is tied to its
scheduler, and transformers' paged cache allocates per request with no sharing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from modelserve.engine.protocol import KvEvent, KvRemoved, KvStored

NO_KEY = -1  # a block that is not full, or whose contents are not known to the cache


def block_key(parent: int, tokens: Sequence[int]) -> int:
    """A full block's key: its parent's key (the root's for a sequence's first block) chained with its tokens."""
    return hash((parent, tuple(tokens)))


def root_key(lora: str) -> int:
    """The parent key of a sequence's first block: NO_KEY for the base model, one of its own for each LoRA
    adapter, whose keys and values differ from the base model's for the same tokens."""
    return hash(("lora", lora)) if lora else NO_KEY


@dataclass(slots=True)
class Block:
    id: int
    refs: int = 0
    key: int = NO_KEY
    tokens: tuple[int, ...] = ()  # a full block's tokens, compared on a cache hit
    parent: int = NO_KEY


@dataclass(slots=True)
class BlockTable:
    """One sequence's blocks, in order, and how many of its leading blocks are keyed (full and cached)."""

    blocks: list[int] = field(default_factory=list)
    keyed: int = 0  # blocks[:keyed] are full and registered under their key
    last_key: int = NO_KEY  # the key of blocks[keyed - 1] (the root's while none is keyed)
    lora: str = ""  # the adapter its keys and values were computed with


class BlockManager:
    """Allocates blocks to sequences; shares and caches full blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV budget holds no block of {block_size} tokens")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # A block's record is made when it is first taken: a default CPU budget is half a million blocks, and
        # making them all up front cost a second of every start.
        self.blocks: dict[int, Block] = {}
        # Least recently freed first, never-used blocks (in order) before all: touched_blocks relies on it.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_key: dict[int, int] = {}  # key -> block id
        self.hit_tokens = 0  # prompt tokens served from cached blocks, since the start
        self._events: list[KvEvent] = []  # the cache's changes since take_events(), for routers (KV events)

    def take_events(self) -> list[KvEvent]:
        """The prefix cache's changes (blocks stored, blocks removed) since the last call, in order."""
        events, self._events = self._events, []
        return events

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def touched_blocks(self) -> int:
        """Blocks ever taken. They are blocks 0 to touched_blocks - 1: never-used blocks come first off the
        free list, in order."""
        return len(self.blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def cached_blocks(self) -> int:
        """Blocks whose contents a later prompt could reuse (held or free)."""
        return len(self._by_key)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- the prefix cache ---------------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int], lora: str = "") -> list[int]:
        """The cached blocks that begin `tokens` (computed with adapter `lora`), in order. The last token is
        never covered: its logits are what a prompt is computed for."""
        found: list[int] = []
        parent = root_key(lora)
        size = self.block_size
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % size, size):
            chunk = tuple(tokens[start : start + size])
            key = block_key(parent, chunk)
            block_id = self._by_key.get(key)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.tokens != chunk or block.parent != parent:
                break
            found.append(block_id)
            parent = key
        return found

    # ---- allocation ---------------------------------------------------------------------------------------

    def can_allocate(self, n_blocks: int, shared: Sequence[int] = ()) -> bool:
        """Could `n_blocks` new blocks be taken, after `shared` cached blocks (that leave the free list if
        they are on it) are taken by reference?"""
        reclaimed = sum(1 for b in shared if self.blocks[b].refs == 0)
        return self.free_blocks - reclaimed >= n_blocks

    def allocate(self, table: BlockTable, n_tokens: int, shared: Sequence[int] = (), lora: str = "") -> None:
        """Give an empty `table` the `shared` cached blocks (by reference), then fresh blocks up to `n_tokens`;
        its blocks are keyed as computed with adapter `lora`."""
        assert not table.blocks
        for block_id in shared:
            block = self.blocks[block_id]
            if block.refs == 0:
                del self._free[block_id]
            block.refs += 1
            table.blocks.append(block_id)
        table.keyed = len(shared)
        table.lora = lora
        table.last_key = self.blocks[shared[-1]].key if shared else root_key(lora)
        self.hit_tokens += len(shared) * self.block_size
        self.grow(table, n_tokens)

    def grow(self, table: BlockTable, n_tokens: int) -> None:
        """Add fresh blocks until `table` holds `n_tokens` (the caller checked `can_grow`)."""
        for _ in range(self.blocks_for(n_tokens) - len(table.blocks)):
            table.blocks.append(self._take())

    def can_grow(self, table: BlockTable, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(table.blocks) <= self.free_blocks

    def commit(self, table: BlockTable, tokens: Sequence[int], n_computed: int) -> None:
        """Key the blocks that the first `n_computed` tokens (now in memory) have filled, so later prompts
        can share them."""
        size = self.block_size
        while (table.keyed + 1) * size <= n_computed:
            index = table.keyed
            chunk = tuple(tokens[index * size : (index + 1) * size])
            key = block_key(table.last_key, chunk)
            block = self.blocks[table.blocks[index]]
            if block.key == NO_KEY and key not in self._by_key:
                block.key, block.tokens, block.parent = key, chunk, table.last_key
                self._by_key[key] = block.id
                parent = table.last_key if index else NO_KEY  # a router keys the adapter by its name
                self._events.append(KvStored(key, parent, list(chunk), table.lora))
            table.keyed += 1
            table.last_key = key

    def free(self, table: BlockTable) -> None:
        """Drop a sequence's hold on its blocks, last first: a prefix stays cached longer than what follows."""
        for block_id in reversed(table.blocks):
            block = self.blocks[block_id]
            block.refs -= 1
            if block.refs == 0:
                self._free[block_id] = None
        table.blocks.clear()
        table.keyed = 0
        table.last_key = NO_KEY

    def flush_cache(self) -> int:
        """Forget every cached block no sequence holds (held ones stay shared); return how many."""
        dropped = []
        for block_id in self._free:
            block = self.blocks.get(block_id)
            if block is not None and block.key != NO_KEY:
                if self._by_key.get(block.key) == block_id:
                    del self._by_key[block.key]
                    dropped.append(block.key)
                block.key, block.tokens, block.parent = NO_KEY, (), NO_KEY
        if dropped:
            self._events.append(KvRemoved(dropped))
        return len(dropped)

    def _take(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks.get(block_id)
        if block is None:
            self.blocks[block_id] = Block(block_id, refs=1)
            return block_id
        if block.key != NO_KEY:  # evicted from the cache: its contents are about to change
            if self._by_key.get(block.key) == block_id:
                del self._by_key[block.key]
                self._events.append(KvRemoved([block.key]))
            block.key, block.tokens, block.parent = NO_KEY, (), NO_KEY
        block.refs = 1
        return block_id
