"""Our own forward for the Llama family (llama, mistral, qwen2, qwen3), as gpt-fast and nano-vllm write it.

transformers' forward is written for every use (training, masks, caches, outputs); a serving step needs
one path. Here: the query, key and value projections are one matmul, gate and up one more; the
rotary table is computed once for every position the model serves and indexed per step; attention is
the paged one (attention.py) on flat [tokens, heads, dim] tensors; the LM head runs on the sampled
tokens only. Fewer, larger kernels and no Python per layer beyond the few calls it makes: on a CPU a
small model's step is mostly dispatch, and on a GPU it is what a CUDA graph records. A step whose rows run
LoRA adapters adds each fused projection's adapter product, for every row at once (lora.py).

The linear layers come through cpu_linears.py: fused, and on a CPU packed for oneDNN, with the model's
modules left computing the same products, so no weight is held twice and generate() on the model still
works. The norms, the activation and the rotary formula are the model's own functions, so fp32 outputs
equal transformers' token for token (tests/test_families.py checks it). A model whose projections are
not plain linear layers (INT8) keeps them unfused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from modelserve.engine.attention import StepContext, attend
from modelserve.engine.cpu_linears import Linears, Projection

if TYPE_CHECKING:
    from modelserve.engine.tensor_parallel import TensorParallel

OWN_FORWARD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports(model: PreTrainedModel) -> bool:
    """Is this model one our forward computes exactly as transformers does?"""
    config = model.config
    if config.model_type not in OWN_FORWARD_TYPES:
        return False
    if not type(model).__module__.startswith("transformers."):  # its own code (remote code) may differ: run it
        return False
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    layers: Any = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers)


class _Layer:
    def __init__(self, layer: Any, index: int, window: int | None, linears: Linears) -> None:  # untyped modules
        attn, mlp = layer.self_attn, layer.mlp
        self.index = index
        self.window = window
        self.input_norm: Projection = layer.input_layernorm
        self.post_norm: Projection = layer.post_attention_layernorm
        self.q_size = attn.q_proj.out_features  # read before fusing, which may make the modules its Columns
        self.kv_size = attn.k_proj.out_features
        self.inner = mlp.gate_proj.out_features
        self.qkv = linears.fused(attn, ["q_proj", "k_proj", "v_proj"])
        self.q_norm: Projection | None = getattr(attn, "q_norm", None)
        self.k_norm: Projection | None = getattr(attn, "k_norm", None)
        self.o_proj = linears.module(attn, "o_proj")
        self.scaling = float(attn.scaling)
        self.gate_up = linears.fused(mlp, ["gate_proj", "up_proj"])
        self.act: Projection = mlp.act_fn
        self.down = linears.module(mlp, "down_proj")


class LlamaForward:
    """A Llama-family model's forward over a step's flat tokens and the paged KV memory."""

    def __init__(
        self, model: PreTrainedModel, max_positions: int, linears: Linears, tp: TensorParallel | None = None
    ) -> None:
        """With `tp`, the model's layers hold this rank's shard (tensor_parallel.py): its share of the heads,
        and a partial sum out of o_proj and down_proj, which the ranks add up."""
        config = model.config
        world = tp.world if tp is not None else 1
        self.reduce = tp.all_reduce if tp is not None else None
        base: Any = model.model
        self.embed: Projection = base.embed_tokens
        self.norm: Projection = base.norm
        self.lm_head = linears.lm_head(model)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.heads = int(config.num_attention_heads) // world
        self.kv_heads = int(config.num_key_value_heads) // world
        with torch.no_grad():
            positions = torch.arange(max_positions, device=model.device)[None]
            probe = torch.zeros(1, dtype=model.dtype, device=model.device)
            cos, sin = base.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        mistral_window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.layers = [
            _Layer(layer, i, getattr(layer.self_attn, "sliding_window", mistral_window), linears)
            for i, layer in enumerate(base.layers)
        ]

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, context: StepContext) -> torch.Tensor:
        """The final norm's output [tokens, hidden] for the step's tokens."""
        h = self.embed(input_ids)
        tokens = h.shape[0]
        cos, sin = self.cos[positions], self.sin[positions]
        lora = context.lora
        for layer in self.layers:
            residual = h
            x = layer.input_norm(h)
            qkv = layer.qkv(x)
            if lora is not None:
                qkv = qkv + lora.delta("qkv", layer.index, x)
            q = qkv[:, : layer.q_size].view(tokens, self.heads, self.head_dim)
            k = qkv[:, layer.q_size : layer.q_size + layer.kv_size].view(tokens, self.kv_heads, self.head_dim)
            v = qkv[:, layer.q_size + layer.kv_size :].view(tokens, self.kv_heads, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            o = attend(
                context,
                layer.index,
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                layer.scaling,
                layer.window,
            )
            o = o.reshape(tokens, -1)
            out = layer.o_proj(o)
            if lora is not None:
                out = out + lora.delta("o", layer.index, o)
            if self.reduce is not None:
                self.reduce(out)
            h = residual + out
            residual = h
            x = layer.post_norm(h)
            gate_up = layer.gate_up(x)
            if lora is not None:
                gate_up = gate_up + lora.delta("gate_up", layer.index, x)
            m = layer.act(gate_up[:, : layer.inner]) * gate_up[:, layer.inner :]
            out = layer.down(m)
            if lora is not None:
                out = out + lora.delta("down", layer.index, m)
            if self.reduce is not None:
                self.reduce(out)
            h = residual + out
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as the Llama family's `apply_rotary_pos_emb` computes it, op for op: x [tokens,
    heads, dim], cos and sin [tokens, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None]) + (rotated * sin[:, None])
