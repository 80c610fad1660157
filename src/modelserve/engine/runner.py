"""The compute: prefill a prompt chunk, decode one token for every running row.

Plain transformers forward passes; keys and values go to our own memory
(kv_cache.py) through a ForwardCache, and positions come from each row's own
length, so rows of different lengths share a step.

On CUDA, attention avoids cuDNN's SDPA backend: it builds an execution plan
for every new sequence shape, and a continuous-batching engine makes a new
shape almost every step. Measured on an H100 with a 1B Llama in bf16: 90 ms a
decode step with it, 25 ms without (bench/step_profile.py, docs/benchmarks.md).
On CUDA, decode steps replay CUDA graphs of the decoder stack (cuda_graphs.py)
unless `cuda_graphs` is off (`--enforce-eager`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, PreTrainedModel

from modelserve.engine.cuda_graphs import DecodeGraphs
from modelserve.engine.kv_cache import ForwardCache, KVPool, KVShape, PrefillBuffer
from modelserve.engine.masks import DecodeMasks

log = logging.getLogger(__name__)

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, cuda_graphs: bool = False) -> None:
        self.model = model
        self.device = model.device
        self.kv_shape = self._probe_kv_shape()
        self._cache = ForwardCache(self.kv_shape.n_layers, check_mask=self.device.type == "cpu")
        self.masks = DecodeMasks.for_model(model)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = self._decode_graphs()

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode, if this model's logits are its LM head applied to its decoder's output."""
        if not self._logits_are_lm_head():
            log.info("decode runs eagerly: this model's logits are more than its LM head (a soft-cap or a scale)")
            return None
        log.info("decode replays CUDA graphs, captured per batch and width bucket on first use (--enforce-eager: off)")
        return DecodeGraphs(self.model.get_decoder(), self._cache, self.masks, self.device)

    @torch.inference_mode()
    def _logits_are_lm_head(self) -> bool:
        ids = torch.arange(1, 5, device=self.device)[None, :]
        full = self.model(input_ids=ids).logits[0, -1]
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        return bool(torch.allclose(full.float(), self.model.get_output_embeddings()(hidden).float(), atol=1e-3))

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
        with self._attention_backends():
            if self.graphs is not None:
                logits: torch.Tensor = self.model.get_output_embeddings()(self.graphs.hidden_states(pool))
                return logits
            input_ids, positions, columns = pool.begin_decode(pool.rows, pool.decode_width())
            self._cache.target = pool
            out = self.model(
                input_ids=input_ids,
                attention_mask=self.masks.build(columns, positions),
                position_ids=positions[:, None],
                cache=self._cache,
                use_cache=True,
            )
        logits = out.logits[:, -1]
        return logits
