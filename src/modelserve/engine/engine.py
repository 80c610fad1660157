"""The engine in one process: the core on a thread of its own, the frontend on the event loop.

The library form of the engine, for tests and for the benchmark's in-process
baseline; the server runs the core in a process of its own (client.py), so that
the model and the gRPC event loop never share a GIL. Commands reach the thread
through a queue; each step's output comes back with one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer
from transformers import PreTrainedModel

from modelserve.config import AUTO_WAITING_KV_BUDGETS, Config
from modelserve.engine.admission import QueueLimits
from modelserve.engine.core import EngineCore
from modelserve.engine.core_loop import run_core_loop
from modelserve.engine.frontend import EngineFrontend, RequestStream
from modelserve.engine.protocol import Command, Shutdown, StepOutput
from modelserve.engine.request import FinishReason, StepRecord
from modelserve.engine.tensor_parallel import TensorParallel
from modelserve.models.quantize import weight_bytes

__all__ = ["Engine", "EngineConfig", "RequestStream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's share of the server's Config (its defaults are Config's, written once there)."""

    max_batch_size: int = Config.max_batch_size
    prefill_chunk_tokens: int = Config.prefill_chunk_tokens  # 0 = AUTO_PREFILL_CHUNK_CPU / _CUDA
    long_prefill_chunk_tokens: int = Config.long_prefill_chunk_tokens  # 0 = AUTO_LONG_PREFILL_CHUNK_CPU / the chunk
    max_num_batched_tokens: int = Config.max_num_batched_tokens  # 0 = AUTO_MAX_NUM_BATCHED_TOKENS_*
    kv_cache_bytes: int = Config.kv_cache_bytes  # 0 = a share of free GPU memory, DEFAULT_CPU_KV_BYTES on CPU
    gpu_memory_fraction: float = Config.gpu_memory_fraction
    enforce_eager: bool = Config.enforce_eager  # on CUDA: no CUDA graphs for decode
    prefix_caching: bool = Config.prefix_caching  # reuse cached keys and values of shared prompt prefixes
    own_forward: bool = Config.own_forward  # the Llama family on our own forward (llama_forward.py)
    max_waiting_requests: int = Config.max_waiting_requests  # more are refused (QueueFullError)
    max_waiting_tokens: int = Config.max_waiting_tokens  # 0 = AUTO_WAITING_KV_BUDGETS x the KV budget
    tensor_parallel_size: int = Config.tensor_parallel_size  # ranks the model is split over (core process only)
    enable_lora: bool = Config.enable_lora  # room for LoRA adapters chosen per request
    max_loras: int = Config.max_loras  # adapters resident at once
    max_lora_rank: int = Config.max_lora_rank

    @classmethod
    def from_config(cls, config: Config) -> EngineConfig:
        engine = cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
        return dataclasses.replace(engine, enable_lora=config.enable_lora or bool(config.lora_modules))

    def queue_limits(self, kv_budget_tokens: int) -> QueueLimits:
        return QueueLimits(
            self.max_waiting_requests, self.max_waiting_tokens or AUTO_WAITING_KV_BUDGETS * kv_budget_tokens
        )

    def build_core(
        self,
        model: PreTrainedModel,
        eos_token_ids: tuple[int, ...],
        max_sequence_length: int,
        observed: bool,
        tokenizer: Tokenizer | None = None,
        tp: TensorParallel | None = None,
    ) -> EngineCore:
        return EngineCore(
            model,
            eos_token_ids,
            self.max_batch_size,
            self.prefill_chunk_tokens,
            self.kv_cache_bytes,
            self.gpu_memory_fraction,
            max_sequence_length,
            observed=observed,
            cuda_graphs=not self.enforce_eager,
            prefix_caching=self.prefix_caching,
            max_num_batched_tokens=self.max_num_batched_tokens,
            own_forward=self.own_forward,
            tokenizer=tokenizer,
            max_loras=self.max_loras if self.enable_lora else 0,
            max_lora_rank=self.max_lora_rank,
            tp=tp,
            long_prefill_chunk_tokens=self.long_prefill_chunk_tokens,
        )


class Engine(EngineFrontend):
    """Continuous batching over one model, in this process: submit, stream events, abort."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        eos_token_ids: Iterable[int],
        config: EngineConfig,
        max_sequence_length: int,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self.core = config.build_core(
            model, tuple(eos_token_ids), max_sequence_length, observed=on_step is not None, tokenizer=tokenizer
        )
        self.weight_bytes = weight_bytes(model)  # what the process engine's core reports in CoreReady
        super().__init__(
            tokenizer, config.queue_limits(self.core.kv_budget_tokens), self.core.max_sequence_tokens, on_step
        )
        self._stats = self.core.stats()
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._thread = threading.Thread(target=self._run, args=(loop,), name="modelserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(Shutdown())
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._core_stopped("the engine stopped")

    def _send(self, command: Command) -> None:
        self._inbox.put(command)

    def _take(self, block: bool) -> list[Command]:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(out: StepOutput) -> None:
            loop.call_soon_threadsafe(self._on_output, out)

        try:
            run_core_loop(self.core, self._take, emit)
        except BaseException:
            log.exception("engine loop died")
            raise
        finally:
            if not loop.is_closed():
                emit(self.core.end_all(FinishReason.CANCELLED, "the engine stopped"))
                loop.call_soon_threadsafe(self._core_stopped, "the engine stopped")
