"""The compute: prefill a prompt chunk, decode one token for every running row.

Plain transformers forward passes; keys and values go to our own memory
(kv_cache.py) through a ForwardCache, and positions come from each row's own
length, so rows of different lengths share a step.

On CUDA, attention avoids cuDNN's SDPA backend: it builds an execution plan
for every new sequence shape, and a continuous-batching engine makes a new
shape almost every step. Measured on an H100 with a 1B Llama in bf16: 90 ms a
decode step with it, 25 ms without (bench/step_profile.py, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, PreTrainedModel

from modelserve.engine.kv_cache import ForwardCache, KVPool, KVShape, PrefillBuffer

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        self.kv_shape = self._probe_kv_shape()
        self._cache = ForwardCache(self.kv_shape.n_layers)

    def synchronize(self) -> None:
        """Wait for queued device work, so a phase's timing is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _attention_backends(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cuda":
            return sdpa_kernel(_CUDA_SDPA_BACKENDS)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _probe_kv_shape(self) -> KVShape:
        """One token through the model tells the KV geometry for any architecture."""
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), cache=cache, use_cache=True)
        keys = cache.layers[0].keys
        assert keys is not None
        return KVShape(len(cache.layers), keys.shape[1], keys.shape[3], keys.dtype, keys.device)

    @torch.inference_mode()
    def prefill_chunk(self, buffer: PrefillBuffer, token_ids: list[int]) -> torch.Tensor:
        """Run the next chunk of a prompt; return the logits [vocab] after its last token."""
        start, n = buffer.past, len(token_ids)
        buffer.begin(n)
        self._cache.target = buffer
        with self._attention_backends():
            out = self.model(
                input_ids=torch.tensor([token_ids], device=self.device),
                position_ids=torch.arange(start, start + n, device=self.device)[None, :],
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        buffer.end()
        logits: torch.Tensor = out.logits[0, -1]
        return logits

    @torch.inference_mode()
    def decode(self, pool: KVPool) -> torch.Tensor:
        """Feed each row its next token at its own position (both kept in the pool); return logits [rows, vocab]."""
        input_ids, mask, positions = pool.begin_decode()
        self._cache.target = pool
        with self._attention_backends():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
            )
        logits: torch.Tensor = out.logits[:, -1]
        return logits
