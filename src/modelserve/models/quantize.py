"""INT8 weight-only quantisation (`--quantization int8`): linear weights kept as int8, one scale per output row.

A decode step reads every weight once, so on a CPU, or a GPU at small batches, its time is
mostly memory traffic; int8 weights are a quarter of float32's bytes and half of bf16's.

The matrix product is torch's own `aten._weight_int8pack_mm(x, w_int8, scales)` (the kernel gpt-fast and
torchchat use), which reads the int8 weight directly. Not torchao: its int8 weight-only layout is fast
only under torch.compile; in eager mode, which is how modelserve runs, it dequantises each whole weight
on every call and can be slower than bf16 (transformers issue 34310), and its first int8 configs were
deprecated in early 2026.

The op on torch 2.13, as read from its source and tried on this CPU (layer by layer, before this module):

- x is 2-D [M, K], float32, float16 or bfloat16; w is int8 [N, K] and contiguous; scales are 1-D [N].
- CPU: scales must have x's dtype. The x86 kernel is vectorised (AVX2/AVX512) for bfloat16 only; float32
  and float16 run a scalar loop (a GPT-2-small layer: 9x slower than with a bfloat16 x at batch 1, 20x
  at batch 32). So on a CPU activations go in as bfloat16 whatever the model's dtype, and the result is
  cast back; the kernel accumulates in float32. It steps K by 16 with no tail (K = 24 gave garbage), so
  layers whose K is not a multiple of 16 stay unquantised; it reads x's rows as K apart, so x is made
  contiguous; and it loads x with 32-byte aligned vector loads (an x 16 bytes off crashed the process),
  so an unaligned x is copied first.
- CPU speed (2 threads of a Xeon with AMX): at batch 1 a GPT-2-small layer ran ~3x faster than in
  float32 or bfloat16; at batch 32 ~1.3x slower than float32 and ~4x slower than bfloat16, which
  oneDNN runs on AMX while this kernel does float32 FMAs. The whole model's decode
  (bench/quant_bench.py, docs/benchmarks.md): 1.3-1.4x float32's tokens/s at batch 1, 0.5-0.7x
  bfloat16's at batch 32. The gain is for small batches, and for memory.
- CUDA: the kernel converts x and scales to float32 itself, so x goes in as it is (made contiguous: it
  too reads row m at m * K) and scales stay float32. It is a plain loop, one thread per output
  (aten/src/ATen/native/cuda/int8mm.cu), not a tuned GEMM, and it was not measured here (no GPU): expect
  int8 to save GPU memory rather than time; `python -m bench.quant_bench --device cuda` measures it.
  A torch without that kernel fails at start-up with a message saying so.

The LM head and the embeddings stay as loaded. GPT-2 (and other tied models) share the LM head with the
token embedding, so an int8 copy would add memory rather than save it; and the logits decide greedy
tokens directly, where an error is least forgiven. GPT-2's Conv1D layers store their weight transposed
([in, out]); they are quantised like nn.Linear from the transpose.

Memory: int8 must lower what the process holds, not add to it. `quantize_model` takes the model as
from_pretrained leaves it, on the CPU, and places it on its device itself: each layer's int8 weight is made
on the device from one float weight at a time, so the float model never sits on the device whole (on CUDA
the quantisation's temporaries go back to the driver before the KV pool is sized). On the CPU the float
weights are views into from_pretrained's mapping of the safetensors file, and that mapping lives while any
tensor in it does: the pages of the float weights just replaced stayed resident as long as the embeddings
did (GPT-2-small, fp32, 256 MiB KV: the engine process held 1,197 MiB with int8 against 1,083 MiB
without). So the tensors that stay are copied out of it, and it closes: 849 MiB with int8, the 243 MiB the
linear weights shed less heap slack (`python -m bench.quant_bench --only-rss`). The embeddings and LM head
(147 MiB of GPT-2-small's float32 weights) are now most of what int8 leaves in the model's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelserve.config import QUANTIZATIONS
from modelserve.models.weight_memory import copy_out_of_mappings, release_freed_memory

log = logging.getLogger(__name__)

_CPU_K_MULTIPLE = 16  # the CPU kernel's step along K, with no tail loop
_CPU_ALIGN_BYTES = 32  # the CPU kernel's aligned vector loads of x
_INT8_MAX = 127  # symmetric: -127..127, so a row's scale is its largest |w| / 127


class QuantizationError(ValueError):
    """The model cannot be quantised as asked; the message (one line) says why."""


class Int8WeightOnlyLinear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 [out, in] and one float scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """`weight` is a float [out_features, in_features] matrix (nn.Linear's layout)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        on_cpu = weight.device.type == "cpu"
        # The CPU kernel is fast for bfloat16 only and wants scales in x's dtype; CUDA's casts to float32.
        self.activation_dtype: torch.dtype | None = torch.bfloat16 if on_cpu else None
        scales_dtype = self.activation_dtype or torch.float32
        w = weight.detach().float()
        # Rounded to their stored dtype first, so each int8 value is the nearest for the scale actually used.
        scales = (w.abs().amax(dim=1) / _INT8_MAX).clamp(min=torch.finfo(scales_dtype).tiny).to(scales_dtype)
        quantised = torch.round(w / scales.float()[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        self.weight = nn.Parameter(quantised.contiguous(), requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        # A copy: the loaded bias is a view into the weights file's mapping, which it would keep open.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.activation_dtype is not None:  # the CPU kernel
            flat = flat.to(self.activation_dtype)
        flat = flat.contiguous()  # both kernels read row m at m * K
        if self.activation_dtype is not None and flat.data_ptr() % _CPU_ALIGN_BYTES:
            flat = flat.clone()
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers: what its weights take in memory."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _check_kernel(device: torch.device) -> None:
    """Fail at start-up, not on the first request, where this torch has no int8 kernel for `device`."""
    x = torch.zeros(1, _CPU_K_MULTIPLE, dtype=torch.bfloat16 if device.type == "cpu" else torch.float32, device=device)
    w = torch.zeros(1, _CPU_K_MULTIPLE, dtype=torch.int8, device=device)
    try:
        torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(1, dtype=x.dtype, device=device))
    except (NotImplementedError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(
            f"--quantization int8: torch {torch.__version__} has no {device.type} kernel for "
            f"aten._weight_int8pack_mm ({first_line})"
        ) from exc


def quantize_model(model: nn.Module, quantization: str, device: torch.device | None = None) -> None:
    """Quantise `model`'s linear layers in place as `quantization` says ("none" leaves them as they are), and
    leave the whole model on `device` (None: where its weights are now) holding no float copy of them.

    Give it the model as loaded, on the CPU: each int8 weight is made on `device` from one float weight at a
    time, and the kernel is checked there.
    """
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"--quantization {quantization}: expected one of {', '.join(QUANTIZATIONS)}")
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    if quantization == "none":
        model.to(device)
        return
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # (parent, name) only: a replaced layer's float weight is freed as soon as its int8 one exists.
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear | Conv1D) and child is not head
    ]
    if not targets:
        raise QuantizationError(f"--quantization int8: {type(model).__name__} has no linear layers to quantise")
    _check_kernel(device)
    before = after = kept = 0
    with torch.no_grad():
        for parent, name in targets:
            child = getattr(parent, name)
            weight = child.weight.T if isinstance(child, Conv1D) else child.weight  # Conv1D's is [in, out]
            if device.type == "cpu" and weight.shape[1] % _CPU_K_MULTIPLE:
                kept += 1
                continue
            bias = None if child.bias is None else child.bias.to(device)
            layer = Int8WeightOnlyLinear(weight.to(device), bias)
            before += weight_bytes(child)
            after += weight_bytes(layer)
            setattr(parent, name, layer)
            del child, weight, bias  # the last references to the float layer: it goes now, not after the loop
        model.to(device)  # the rest: embeddings, LM head, norms, and layers kept as loaded
        if device.type == "cpu":
            copy_out_of_mappings(model, own_storage=(Int8WeightOnlyLinear,))
    release_freed_memory(device)
    log.info(
        "--quantization int8: %d linear layers hold int8 weights with per-row scales (%.1f MiB -> %.1f MiB); "
        "the LM head and embeddings keep the model's dtype%s",
        len(targets) - kept,
        before / 2**20,
        after / 2**20,
        f"; {kept} layers are kept as loaded (input width not a multiple of {_CPU_K_MULTIPLE})" if kept else "",
    )
