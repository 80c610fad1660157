"""Can the engine run this model correctly? A check of its config, instead of an allow-list.

The engine serves any transformers decoder-only causal LM whose layers keep keys
and values per token: full attention, sliding-window attention (per layer, as
Gemma 2/3 mix them), eager-only attention (Gemma 2's soft-capping). It refuses,
at start-up and saying why, what it cannot run: encoder-decoder models, and
layers whose state is not a key/value cache (state-space, linear attention,
convolutions) or whose attention pattern the engine's masks do not build
(chunked attention). The runner's probe forward then checks the cache it
actually gets (engine/runner.py), and architectures outside FAMILIES get a
greedy self-check against transformers' generate() at start-up (engine/self_check.py).
"""

from __future__ import annotations

from typing import Any

#: Families the test suite checks token for token against generate() (tests/test_families.py), with
#: whether their configs use a sliding window. Others are served after the start-up self-check.
FAMILIES: dict[str, bool] = {
    "gpt2": False,
    "llama": False,
    "qwen2": True,
    "qwen3": True,
    "mistral": True,
    "gemma2": True,
    "gemma3_text": True,
    "phi": False,
    "phi3": True,
    "olmo2": False,
    "granite": False,
    "stablelm": False,
    "gpt_neox": False,
    "starcoder2": True,
    "smollm3": False,
    "falcon": False,
}

ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention"})

# Model types whose state is recurrent, not keys and values (config.layer_types does not always say so).
_RECURRENT_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma"})


def unsupported_reason(config: Any) -> str | None:
    """Why the engine cannot serve a model with this config, or None when it can."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return f"{model_type!r} is an encoder-decoder model; the engine serves decoder-only causal LMs"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        return f"{model_type!r} has no causal-LM class in transformers (not a text generation model)"
    if model_type in _RECURRENT_TYPES:
        return f"{model_type!r} keeps a recurrent (state-space) state, not keys and values per token"
    other = set(getattr(config, "layer_types", None) or ()) - ATTENTION_KINDS
    if other:
        return (
            f"{model_type!r} has layers of kind {', '.join(sorted(other))}: the engine runs full and "
            "sliding-window attention layers, whose state is keys and values per token"
        )
    return None
