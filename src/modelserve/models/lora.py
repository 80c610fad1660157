"""LoRA adapters in PEFT's format, checked against the base model before any of their weights is used.

A PEFT LoRA directory holds adapter_config.json (`r`, `lora_alpha`, `target_modules`, ...) and
adapter_model.safetensors with, per adapted linear layer, `...<module>.lora_A.weight` [r, in] and
`...<module>.lora_B.weight` [out, r]; the layer then computes x Wᵀ + scaling (x Aᵀ) Bᵀ, scaling being
lora_alpha / r (lora_alpha / √r with use_rslora). Read here from the safetensors header (shapes only), so
that an adapter that does not fit is refused with what does not fit, in the frontend, before the engine
core loads it (engine/lora.py). PEFT itself is not needed to serve one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

if TYPE_CHECKING:  # the frontend reads and checks adapters without torch; the engine core loads their tensors
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The Llama family's linear layers our forward adapts (llama_forward.py), by the name PEFT gives them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTENTION_MODULES + MLP_MODULES
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config.json settings that change the computation in ways this server does not reproduce.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained copies of layers)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
}


class LoraError(ValueError):
    """An adapter that cannot be served, and why (the message names what does not fit)."""


@dataclass(frozen=True)
class LoraTarget:
    """What an adapter must fit: the base model's decoder layers and its adaptable modules' (in, out) sizes."""

    layers: int
    shapes: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter checked against the base model: where it is and the shape of what it changes."""

    name: str
    path: str
    rank: int
    scaling: float
    modules: tuple[str, ...]  # the adapted modules, in MODULES order


def lora_target(config: Any) -> LoraTarget | None:
    """What adapters of a model with this config must fit; None for a family our forward does not run
    (llama_forward.py's), which cannot take adapters."""
    if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        return None
    return LoraTarget(int(config.num_hidden_layers), module_shapes(config))


def module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable linear layer of a Llama-family model's config."""
    hidden, inner = int(config.hidden_size), int(config.intermediate_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    q, kv = int(config.num_attention_heads) * head_dim, int(config.num_key_value_heads) * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def parse_lora_modules(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """--lora-modules' NAME=DIR items as (name, dir), in order; LoraError for a malformed or repeated one."""
    parsed: list[tuple[str, str]] = []
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoraError(f"--lora-modules item {item!r} is not NAME=DIR")
        if name in (n for n, _ in parsed):
            raise LoraError(f"--lora-modules names {name!r} twice")
        parsed.append((name, path))
    return parsed


def read_adapter(name: str, path: str, target: LoraTarget, max_rank: int) -> LoraAdapter:
    """The adapter in directory `path`, checked against the base model (`target`); LoraError when it does not
    fit (not PEFT LoRA, a rank over `max_rank`, a module or shape the base model does not have)."""
    root = Path(path)
    if not (root / CONFIG_FILE).is_file():
        raise LoraError(f"LoRA adapter {name!r}: {path} has no {CONFIG_FILE} (not a PEFT adapter directory)")
    if not (root / WEIGHTS_FILE).is_file():
        raise LoraError(f"LoRA adapter {name!r}: {path} has no {WEIGHTS_FILE}")
    try:
        settings = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not readable JSON: {exc}") from None
    if settings.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type is {settings.get('peft_type')!r}; only LORA is served")
    for key, what in _UNSUPPORTED.items():
        if settings.get(key):
            raise LoraError(f"LoRA adapter {name!r}: {what} is not supported")
    if settings.get("bias", "none") != "none":
        raise LoraError(f"LoRA adapter {name!r}: bias is {settings['bias']!r}; only 'none' is supported")
    rank = int(settings.get("r", 0))
    if not 0 < rank <= max_rank:
        raise LoraError(f"LoRA adapter {name!r}: its rank r={rank} is over --max-lora-rank {max_rank}")
    alpha = float(settings.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    modules = _check_weights(name, root / WEIGHTS_FILE, target, rank)
    return LoraAdapter(name, str(root), rank, scaling, modules)


def _check_weights(name: str, weights: Path, target: LoraTarget, rank: int) -> tuple[str, ...]:
    shapes, layers = target.shapes, target.layers
    seen: dict[tuple[int, str], set[str]] = {}
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.match(key)
            if match is None or match[3] not in MODULES:
                raise LoraError(
                    f"LoRA adapter {name!r}: {key} adapts a layer this server does not (it adapts the "
                    f"decoder layers' {', '.join(MODULES)})"
                )
            layer, module, side = int(match[1]), match[3], match[4]
            if layer >= layers:
                raise LoraError(f"LoRA adapter {name!r}: {key} is for layer {layer}; the base model has {layers}")
            in_features, out_features = shapes[module]
            expected = [rank, in_features] if side == "A" else [out_features, rank]
            shape = list(tensors.get_slice(key).get_shape())
            if shape != expected:
                raise LoraError(
                    f"LoRA adapter {name!r}: {key} has shape {shape}; the base model's {module} needs {expected} "
                    "(is it an adapter for another base model?)"
                )
            seen.setdefault((layer, module), set()).add(side)
    if not seen:
        raise LoraError(f"LoRA adapter {name!r}: {weights.name} holds no LoRA weights")
    if half := sorted(f"layer {layer} {module}" for (layer, module), sides in seen.items() if sides != {"A", "B"}):
        raise LoraError(f"LoRA adapter {name!r}: lora_A or lora_B is missing for {', '.join(half)}")
    adapted = {module for _, module in seen}
    return tuple(m for m in MODULES if m in adapted)


def load_weights(adapter: LoraAdapter, dtype: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(A [r, in], B [out, r] · scaling) per (layer, module), on the CPU in `dtype`, for the engine core."""
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(adapter.path) / WEIGHTS_FILE), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118
            match = _KEY.match(key)
            assert match is not None  # read_adapter checked every key
            pairs.setdefault((int(match[1]), match[3]), {})[match[4]] = tensors.get_tensor(key)
    for where, pair in pairs.items():
        out[where] = (pair["A"].to(dtype), (pair["B"].float() * adapter.scaling).to(dtype))
    return out
