"""Freeing what a model's weights held once they were replaced (by int8 layers, or by oneDNN-packed ones).

from_pretrained's tensors on a CPU are views into one mapping of the safetensors file, which stays mapped
while any of them lives. Whatever reads the float weights to replace them (quantize.py, cpu_linears.py)
makes those pages resident, and they would stay so, counted in the process's RSS, for as long as the
embeddings or a norm still view the file. So after replacing, the rest is copied out and the allocator
asked to hand back what was freed.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
from torch import nn


def copy_out_of_mappings(
    model: nn.Module, own_storage: tuple[type[nn.Module], ...] = (), made: frozenset[int] = frozenset()
) -> None:
    """Give each float parameter and buffer a storage of its own, one tensor at a time.

    Copied out, the last view goes and the file is unmapped. `.data` is replaced, not the Parameter, so
    tied weights (GPT-2's LM head is its token embedding) stay one tensor. Modules of `own_storage` types,
    oneDNN's blocked tensors, and views of the storages in `made` (by data pointer: weights fused after
    loading, which the modules' parameters view) were made after loading and are left as they are.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, own_storage):
            continue
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is None or tensor.is_mkldnn or id(tensor) in seen:
                continue
            if tensor.untyped_storage().data_ptr() in made:
                continue
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()


def release_freed_memory(device: torch.device) -> None:
    """Hand the memory that replaced weights and their temporaries held back to the system.

    On CUDA, torch's caching allocator keeps freed blocks, and the KV pool is sized from what the driver
    reports free. On the CPU, glibc's malloc keeps freed heap memory: once a large block has been freed it
    raises its mmap threshold (up to 32 MiB), so later blocks of that size come from the heap, where the
    freed temporaries between the new weights leave holes it does not return by itself; and a model
    converted while loading (bf16 from a float32 file), or moved to a GPU, held its float weights there.
    malloc_trim(0) returns those pages. Where the C library is not glibc it does nothing.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # a C library without malloc_trim (musl, macOS)
        ctypes.CDLL(None).malloc_trim(0)
