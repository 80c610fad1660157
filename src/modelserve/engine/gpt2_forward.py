"""Our own forward for GPT-2, the other shape people serve small: learned positions, LayerNorm, one QKV
product (Conv1D in transformers), a GELU MLP.

Why: transformers' GPT-2 forward is written for every use (training, masks, caches, outputs, cross
attention), and on a CPU a small model's step is mostly that Python. Measured on this 2-CPU machine with
the tiny GPT-2 of the benchmarks, transformers' forward with our paged attention was 57% of the engine
core's busy time at one stream (py-spy). Here each layer is the handful of calls the product needs, with
the paged attention (attention.py) on flat [tokens, heads, dim] tensors and the LM head on the sampled
tokens only, as llama_forward.py does for the Llama family.

The linear layers come through cpu_linears.py (packed for oneDNN on a CPU, in the model itself, so
generate() on the model computes the same products), and there the MLP's GELU runs inside its first
product: on a 2,048-token prefill step of gpt2-small in fp32, GELU written out as five tensor operations
took 27% of the step. The norms are the model's own modules, so fp32 outputs equal transformers' token for
token (tests/test_families.py checks it).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from modelserve.engine.attention import StepContext, attend
from modelserve.engine.cpu_linears import Linears, Projection


def supports_gpt2(model: PreTrainedModel) -> bool:
    """Is this a GPT-2 our forward computes exactly as transformers does?"""
    config = model.config
    if config.model_type != "gpt2" or not type(model).__module__.startswith("transformers."):
        return False
    base: Any = getattr(model, "transformer", None)
    return base is not None and not getattr(config, "add_cross_attention", False) and hasattr(base, "h")


class _Block:
    def __init__(self, block: Any, index: int, linears: Linears) -> None:  # untyped modules
        attn, mlp = block.attn, block.mlp
        self.index = index
        self.ln_1: Projection = block.ln_1
        self.ln_2: Projection = block.ln_2
        self.embed = int(attn.split_size)
        self.scaling = float(attn.scaling)
        self.qkv = linears.module(attn, "c_attn")
        self.attn_out = linears.module(attn, "c_proj")
        self.up_act = linears.activated(mlp, "c_fc", "act")
        self.down = linears.module(mlp, "c_proj")


class GPT2Forward:
    """A GPT-2's forward over a step's flat tokens and the paged KV memory."""

    def __init__(self, model: PreTrainedModel, linears: Linears) -> None:
        config = model.config
        base: Any = model.transformer
        self.wte: Projection = base.wte
        self.wpe: Projection = base.wpe
        self.ln_f: Projection = base.ln_f
        self.lm_head = linears.lm_head(model)
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.layers = [_Block(block, i, linears) for i, block in enumerate(base.h)]

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, context: StepContext) -> torch.Tensor:
        """The final norm's output [tokens, hidden] for the step's tokens."""
        h = self.wte(input_ids) + self.wpe(positions)
        tokens = h.shape[0]
        shape = (tokens, self.heads, self.head_dim)
        for layer in self.layers:
            qkv, e = layer.qkv(layer.ln_1(h)), layer.embed
            q, k, v = qkv[:, :e], qkv[:, e : 2 * e], qkv[:, 2 * e :]
            o = attend(
                context,
                layer.index,
                q.view(shape).transpose(0, 1),
                k.view(shape).transpose(0, 1),
                v.view(shape).transpose(0, 1),
                layer.scaling,
                None,
            )
            h = layer.attn_out(o.reshape(tokens, -1)) + h
            h = h + layer.down(layer.up_act(layer.ln_2(h)))
        return self.ln_f(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
