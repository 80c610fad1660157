"""The KV memory's tensors: one slot per token, `block_size` consecutive slots a block, per layer.

Taken whole at start-up (as vLLM does): no allocation in steady state. On a GPU the memory is zeroed
there and then, so an out-of-memory shows at start, not under load. On a CPU it is an anonymous mapping,
which the kernel hands out zeroed a page at a time as it is first written: zeroing the default 4 GiB up
front cost about 3 s of every start and made all of it resident before one request came, memory the
host's other processes could have used. But a page first written during a step costs that step the
kernel's fault (about 2 us a page on this 2-CPU VM alone, up to 15 us beside a process holding memory):
some 218,000 faults in a 32-stream run of gpt2-small in fp32, 600 MB of keys and values. So the core,
when it has nothing to do, faults pages in ahead of use (fill()), 2 MiB at a time, keeping a share of
the budget ready beyond the blocks used so far (core.py's FILL_AHEAD_FRACTION). The block manager takes
every never-used block before it reuses one, so a server that runs long enough has all of its budget
resident either way; filling ahead moves that earlier, not higher. The core warns at start when the
budget is more than the memory available or the cgroup's memory limit (memory_warning()), and then
fills nothing ahead. Tensor-parallel ranks other than the first fault theirs in as steps write it.
Which block holds what is the block manager's business (block_manager.py); these tensors are the
runner's, and nothing else touches them.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from dataclasses import dataclass
from functools import cache

import psutil
import torch

from modelserve.engine.attention import Workspace
from modelserve.engine.cgroups import cgroup_memory_limit

MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, as a write would, leaving their contents alone


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
        self.keys = [_zeros(slots, shape.dtype, shape.device) for _ in range(shape.n_layers)]
        self.values = [_zeros(slots, shape.dtype, shape.device) for _ in range(shape.n_layers)]
        self.workspace = Workspace(shape.kv_heads, shape.head_dim, shape.dtype, shape.device)
        # Blocks [0, filled_blocks) are in memory, or faulted in as written: on a GPU all of them, zeroed above;
        # on a CPU what fill() did (on Linux: elsewhere there is no MADV_POPULATE_WRITE, so all of them).
        self.filled_blocks = 0 if shape.device.type == "cpu" and sys.platform == "linux" else num_blocks

    def fill(self, end_block: int) -> None:
        """Fault in every layer's pages of blocks [filled_blocks, end_block), so that no step stops to have
        them zeroed. The pages' contents stay as they are, so blocks in use may be filled too. Raises OSError
        where the kernel cannot: EINVAL before Linux 5.14, ENOMEM when memory runs short."""
        start, end = self.filled_blocks, min(end_block, self.num_blocks)
        if end <= start:
            return
        block_bytes = self.block_size * self.shape.kv_heads * self.shape.head_dim * self.shape.dtype.itemsize
        first = start * block_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        for tensor in self.keys + self.values:
            _populate(tensor.data_ptr() + first, end * block_bytes - first)
        self.filled_blocks = end


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on a CPU, pages the kernel zeroes when they are first touched (see the module
    docstring). The tensor holds the mapping: it is unmapped when the last view goes."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, max(1, math.prod(shape) * dtype.itemsize))
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


@cache
def _libc() -> ctypes.CDLL:
    """The C library, for madvise: through ctypes the GIL is released while the kernel works (mmap.madvise
    holds it)."""
    return ctypes.CDLL(None, use_errno=True)


def _populate(address: int, length: int) -> None:
    """MADV_POPULATE_WRITE over [address, address + length); `address` is page-aligned."""
    if _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_POPULATE_WRITE) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def memory_warning(kv_bytes: int, device: torch.device) -> str | None:
    """On a CPU, what to say when the KV budget is more than the memory available now or than the
    cgroup's memory limit (a Kubernetes limit): it is not all taken at start, so it would run out under
    load instead (the kernel's OOM killer, in a container)."""
    if device.type != "cpu":
        return None
    available = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if kv_bytes <= available and (limit is None or kv_bytes <= limit):
        return None
    room = f"the memory available now ({available / 2**30:.2f} GiB)"
    if limit is not None and limit < available:
        room = f"this cgroup's memory limit ({limit / 2**30:.2f} GiB)"
    return (
        f"the KV budget ({kv_bytes / 2**30:.2f} GiB) is more than {room}: the KV memory is filled as requests "
        "use it, and the process could run out of memory under load; lower --kv-cache-bytes"
    )
