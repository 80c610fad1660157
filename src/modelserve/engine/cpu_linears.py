"""The engine's linear layers on a CPU: weights prepacked once for oneDNN, not handed to MKL in their loaded layout.

A decode step's matrix products have one row per running request, a few to a few dozen. torch's eager
`linear` gives those to MKL's GEMM with the weight as loaded, and at such shapes MKL spends much of its
time re-laying the weight out. oneDNN can reorder a weight once into its blocked layout and multiply
against it on every call: `torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`, the ops
torch's own compiler (inductor, with freezing) puts in place of a CPU linear, and what vLLM's CPU build
runs. Measured here (2 threads, AVX2, fp32; docs/benchmarks.md): gpt2-small's layers at 32 rows 1.6-2.2
ms against 0.85-1.2 packed, its LM head 45.6 against 20.9 ms; at 1 row 0.16-0.29 against 0.11-0.20 ms,
the LM head 9.9 against 5.0; at 160 rows and more, level within 10%. A whole engine step of gpt2-small:
batch 1 31.7 -> 23.8 ms, batch 32 143 -> 98.5 ms. Written here because no library does this for an
eager model: inductor does it only inside a compiled graph, and ipex (which did) is retired.

Except small fp32 weights (under SMALL_FP32_WEIGHT elements, 1 MiB): there oneDNN's fixed cost a call is
more than MKL's whole product, so they stay as loaded. Measured here (`python -m bench.linear_packing_bench`,
one thread; as loaded against packed): 64 x 1,024 (the tiny preset's LM head) at 1 row 24.6 against 40.6 us
with its weights cold, 6.9 against 22.7 hot, and as loaded still quicker at 64 rows (0.84-0.89); 256 x 256
the same. From 512 x 512 (262,144 elements) on, packing mostly loses at 1 to 4 rows and wins from 16
(512 x 512: 1.02 cold, 1.23 hot), by more the bigger the weight. A whole engine step of tiny at batch 1:
0.53 -> 0.38 ms. In bf16 packing wins or ties at every size (F.linear's bf16 is oneDNN's too, unpacked), so
only fp32 weights are kept as loaded.

What is packed: every other `nn.Linear` and GPT-2's `Conv1D` of the model, in place, so the engine's forward
and the model's own `generate()` compute the same products. Our Llama-family forward fuses projections
first (llama_forward.py) and packs the fused weight; the fused-away modules become column slices of it
(`Columns`), so `generate()` on the model still works. A GELU that follows a product (GPT-2's MLP) runs in
that product's output pass, a oneDNN post-op (`activated`). A weight is freed once packed, and the rest of the
model is then copied out of the safetensors file's mapping, so the file pages the packing read are
unmapped (without that the fp32 gpt2-small core held 1,513 MiB, not 1,001), except an LM head tied to the
embeddings: the embeddings keep the weight and the packed head is a second copy (147 MiB for
gpt2-small in fp32), bought for the head's 2x. Nothing is packed when the model's linears are int8
(their own kernel, and memory is what int8 is for), when the dtype has no oneDNN path on this CPU (bf16
needs AVX512 or AVX-NE-CONVERT), or when a trial product differs from `F.linear`'s: the log says which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import activations
from transformers.pytorch_utils import Conv1D

from modelserve.models.quantize import Int8WeightOnlyLinear
from modelserve.models.weight_memory import copy_out_of_mappings, release_freed_memory

log = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]

SMALL_FP32_WEIGHT = 1 << 18  # elements; an fp32 weight below this is not packed (the docstring's figures)
_TRIAL_ROWS = 3
_TRIAL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W in oneDNN's blocked layout, or GELU(x Wᵀ + b) when `gelu` names oneDNN's GELU
    ("tanh" or "none", the exact erf one). `weight` reports W's shape and dtype (the engine reads the LM
    head's rows as the vocabulary size) but is opaque to any other tensor op."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None) -> None:
        """`weight` is [out_features, in_features], nn.Linear's layout."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._post_op, self._algorithm = ("none", "") if gelu is None else ("gelu", gelu)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        # buffers, not parameters: shared (not copied) by the runner's copy of the model's modules
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            rows.contiguous(), self.weight, self.bias, self._post_op, [], self._algorithm
        )
        return y.view(*x.shape[:-1], self.out_features)


class Columns(nn.Module):
    """One projection's share of a fused one: the fused product's columns [start, stop). Only the model's own
    forward (generate()) calls it; the engine's forward calls the fused product once for all its shares."""

    def __init__(self, fused: PackedLinear, start: int, stop: int) -> None:
        super().__init__()
        self.fused = fused
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused: torch.Tensor = self.fused(x)
        return fused[..., self.start : self.stop]


class Linears:
    """How the engine's forward gets its linear layers: packed on a CPU where oneDNN can, as loaded elsewhere."""

    def __init__(self, model: nn.Module) -> None:
        self.reason = _why_not(model)
        self.packed = self.reason is None
        self.count = 0
        self.bytes = 0
        self.copied_bytes = 0  # weights packed while something else keeps the original (a tied LM head)
        self.activations = 0  # GELUs computed inside a packed product
        self.small = 0  # fp32 weights left as loaded for their size
        self._fused_storages: set[int] = set()  # fused weights left as loaded, which the modules view
        self._embedding_storages = {
            m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)
        }

    def module(self, parent: nn.Module, name: str) -> Projection:
        """`parent.name` as the engine's forward calls it: packed in place where packing is on."""
        child: Any = getattr(parent, name)
        if type(child) not in (nn.Linear, Conv1D) or not self._packs(child.weight):
            if type(child) in (nn.Linear, Conv1D):
                self._as_loaded(child.weight)
            projection: Projection = child
            return projection
        weight = child.weight.t() if type(child) is Conv1D else child.weight
        if weight.untyped_storage().data_ptr() in self._embedding_storages:
            self.copied_bytes += weight.numel() * weight.element_size()
        packed = PackedLinear(weight, child.bias)
        self._count(weight)
        setattr(parent, name, packed)
        return packed

    def activated(self, parent: nn.Module, name: str, act: str) -> Projection:
        """`parent.act(parent.name(x))` as one product: where the activation is a GELU oneDNN computes the
        same, it runs in the packed product's output pass, and `parent.act` becomes the identity so
        `generate()` computes the same. Otherwise the two calls as they are."""
        child: Any = getattr(parent, name)
        activation: Projection = getattr(parent, act)
        gelu = _gelu_algorithm(activation)
        packs = type(child) in (nn.Linear, Conv1D) and self._packs(child.weight)
        if not packs or gelu is None or _fused_gelu_differs(gelu):
            linear = self.module(parent, name)
            return lambda x: activation(linear(x))
        weight = child.weight.t() if type(child) is Conv1D else child.weight
        packed = PackedLinear(weight, child.bias, gelu)
        self._count(weight)
        self.activations += 1
        setattr(parent, name, packed)
        setattr(parent, act, nn.Identity())
        return packed

    def fused(self, parent: nn.Module, names: list[str]) -> Projection:
        """One matmul for several projections of the same input (`parent`'s modules `names`), their outputs
        side by side. Unpacked, the modules' parameters become views into the fused weight; packed, the
        modules become its Columns. Either way no weight is held twice."""
        linears: list[Any] = [getattr(parent, name) for name in names]
        if all(type(m) is Columns for m in linears) and len({id(m.fused) for m in linears}) == 1:
            fused: PackedLinear = linears[0].fused  # fused and packed by an engine before this one
            return fused
        if not all(type(m) is nn.Linear for m in linears):  # e.g. INT8 modules: call them one by one
            return lambda x: torch.cat([m(x) for m in linears], dim=-1)
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            return lambda x: torch.cat([m(x) for m in linears], dim=-1)
        with torch.no_grad():
            weight = torch.cat([m.weight for m in linears])
            bias = torch.cat([m.bias for m in linears]) if all(has_bias) else None
        bounds = [0]
        for m in linears:
            bounds.append(bounds[-1] + m.weight.shape[0])
        if self._packs(weight):
            packed = PackedLinear(weight, bias)
            self._count(weight)
            for name, start, stop in zip(names, bounds, bounds[1:], strict=False):
                setattr(parent, name, Columns(packed, start, stop))
            return packed
        self._as_loaded(weight)
        self._fused_storages.update(t.untyped_storage().data_ptr() for t in (weight, bias) if t is not None)
        for m, start, stop in zip(linears, bounds, bounds[1:], strict=False):
            m.weight = nn.Parameter(weight[start:stop], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        return lambda x: torch.nn.functional.linear(x, weight, bias)

    def lm_head(self, model: nn.Module) -> Projection:
        """The model's output embeddings, as `module` gives them."""
        head = model.get_output_embeddings()  # type: ignore[operator]
        path = next(name for name, m in model.named_modules() if m is head)
        parent, _, name = path.rpartition(".")
        return self.module(model.get_submodule(parent), name)

    def pack_model(self, model: nn.Module) -> None:
        """Pack every linear layer of a model whose transformers forward the engine runs."""
        if not self.packed:
            return
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in (nn.Linear, Conv1D):
                    self.module(parent, name)

    def release_originals(self, model: nn.Module) -> None:
        """After packing: copy the rest of the model out of the safetensors mapping (weight_memory.py), so the
        file pages the packing read are unmapped, and return the freed heap to the system."""
        if self.count:
            copy_out_of_mappings(model, made=frozenset(self._fused_storages))
            release_freed_memory(torch.device("cpu"))

    def log(self) -> None:
        if not self.packed:
            log.info("linear layers run as loaded: %s", self.reason)
            return
        tied = f"; the LM head, tied to the embeddings, is a second copy ({self.copied_bytes / 2**20:.0f} MiB)"
        gelus = f", {self.activations} with their GELU in the product" if self.activations else ""
        small = f"; {self.small} fp32 ones as loaded, under {SMALL_FP32_WEIGHT} elements" if self.small else ""
        log.info(
            "linear layers: %d prepacked for oneDNN (%.0f MiB)%s%s%s (cpu_linears.py)",
            self.count,
            self.bytes / 2**20,
            gelus,
            tied if self.copied_bytes else "",
            small,
        )

    def _packs(self, weight: torch.Tensor) -> bool:
        """Is this weight packed? Where packing is on, unless it is a small fp32 one."""
        return self.packed and not _small(weight)

    def _as_loaded(self, weight: torch.Tensor) -> None:
        """A linear left as loaded: counted for the log when its size is why."""
        if self.packed and _small(weight):
            self.small += 1

    def _count(self, weight: torch.Tensor) -> None:
        self.count += 1
        self.bytes += weight.numel() * weight.element_size()


def _small(weight: torch.Tensor) -> bool:
    """An fp32 weight MKL multiplies faster as loaded than oneDNN packed."""
    return weight.dtype == torch.float32 and weight.numel() < SMALL_FP32_WEIGHT


def _why_not(model: nn.Module) -> str | None:
    """None when this model's linears can be packed here; else why not, for the log."""
    first = next(model.parameters())
    if first.device.type != "cpu":
        return f"oneDNN packing is for CPUs (the model is on {first.device.type})"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return f"torch {torch.__version__} was built without oneDNN"
    if any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()):
        return "the model's linears are int8 (their own kernel)"
    if not type(model).__module__.startswith("transformers."):
        return f"{type(model).__name__} is the model's own code, whose forward may read its weights directly"
    return _trial(first.dtype)


def _trial(dtype: torch.dtype) -> str | None:
    """Pack a small random weight and compare one product with F.linear's."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(dtype)
    bias = torch.randn(48, generator=generator).to(dtype)
    x = torch.randn(_TRIAL_ROWS, 64, generator=generator).to(dtype)
    try:
        got = PackedLinear(weight, bias)(x)
    except (RuntimeError, NotImplementedError) as exc:  # e.g. bf16 on a CPU without AVX512 or AVX-NE-CONVERT
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"oneDNN cannot pack {str(dtype).removeprefix('torch.')} weights on this CPU ({first_line})"
    expected = torch.nn.functional.linear(x, weight, bias)
    if not torch.allclose(got.float(), expected.float(), rtol=_TRIAL_RTOL.get(dtype, 2e-2), atol=1e-3):
        return "oneDNN's product differed from F.linear's in a trial"
    return None


def _gelu_algorithm(activation: Projection) -> str | None:
    """oneDNN's name for this activation module's GELU ("tanh" or "none", the erf one), or None when it is
    not a GELU. Python-written variants are the same function, to rounding."""
    tanh = (activations.NewGELUActivation, activations.FastGELUActivation, activations.GELUTanh)
    if isinstance(activation, tanh):
        return "tanh"
    if isinstance(activation, activations.GELUActivation):
        return "none"
    if isinstance(activation, nn.GELU):
        return "tanh" if activation.approximate == "tanh" else "none"
    return None


@cache
def _fused_gelu_differs(algorithm: str) -> bool:
    """Does oneDNN's GELU post-op (fp32, a small trial) differ from torch's?"""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    x = torch.randn(_TRIAL_ROWS, 64, generator=generator)
    approximate = "tanh" if algorithm == "tanh" else "none"
    expected = nn.functional.gelu(nn.functional.linear(x, weight, bias), approximate=approximate)
    try:
        got = PackedLinear(weight, bias, algorithm)(x)
    except (RuntimeError, NotImplementedError):
        return True
    return not torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
