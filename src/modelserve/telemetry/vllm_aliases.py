"""vLLM's names for the engine's load, for the LLM routers that read them.

The Gateway API Inference Extension's endpoint picker (which llm-d and KServe's LLMInferenceService build
on) scores replicas by `vllm:num_requests_waiting`, `vllm:num_requests_running` and
`vllm:kv_cache_usage_perc`, sizes its prefix index from `vllm:cache_config_info` and reads
`vllm:lora_requests_info` (the LoRA adapters of the running and the waiting requests), unless its flags
name other metrics.
Exporting these names beside ours lets it route to modelserve with its default settings
(docs/gateway.md); `--no-vllm-metrics` turns them off.

A prometheus_client collector in the registry that /metrics serves, not OpenTelemetry instruments: an
instrument name may not contain ':' (the SDK raises), and the exporter would add unit suffixes to the
names anyway. So the aliases reach scrapers only; OTLP carries the modelserve.* names. Like those
gauges, they read the engine's stats at each scrape, so both agree and the engine records nothing more.

The meanings are vLLM's. Waiting: accepted, not yet in the batch. Running: in the batch, prefilling or
decoding (modelserve.requests.waiting counts a prompt being prefilled as waiting; vLLM counts it as
running). KV usage: the fraction of the KV budget that live sequences hold, 0 to 1. cache_config_info is
an info gauge (always 1) whose labels carry the numbers: block_size is the prefix cache's block, the
grain at which a prompt's start is reused, so the picker's prefix index hashes prompts at that grain;
num_gpu_blocks is the KV budget in those blocks, so usage times blocks is the blocks in use, as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from modelserve.config import KV_BLOCK_TOKENS as BLOCK_TOKENS
from modelserve.engine.request import EngineStats

ENGINE = "0"  # vLLM labels each engine core by its index; a modelserve server runs one


class VllmAliases:
    """A prometheus_client collector: the engine's load under vLLM's metric names and labels."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, max_loras: int = 0) -> None:
        self._stats = stats
        self._labels = {"model_name": model_name, "engine": ENGINE}
        self._max_loras = max_loras  # 0: LoRA is off
        self._adapters: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._changed_s = time.time()  # vLLM's lora_requests_info value: when the adapters in use last changed

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        running, waiting = stats.running + stats.prefilling, stats.waiting - stats.prefilling
        yield self._gauge("vllm:num_requests_running", "Requests in the batch, prefilling or decoding", running)
        yield self._gauge("vllm:num_requests_waiting", "Requests accepted and not yet in the batch", waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of the KV cache in use, 0 to 1", stats.kv_usage)
        config = {
            "block_size": str(BLOCK_TOKENS),
            "num_gpu_blocks": str(stats.kv_budget_tokens // BLOCK_TOKENS),
            "enable_prefix_caching": str(stats.prefix_cache_budget_tokens > 0),
            "engine": ENGINE,
        }
        info = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration, in the labels", labels=list(config))
        info.add_metric(list(config.values()), 1)
        yield info
        # The adapters in use, as vLLM says it (comma-separated names; none: empty). A picker that reads this
        # family (by default it does, and some versions count a replica without it as unhealthy) prefers a
        # replica that already runs a request's adapter.
        in_use = (stats.lora_running, stats.lora_waiting)
        if in_use != self._adapters:
            self._adapters, self._changed_s = in_use, time.time()
        lora = {
            "max_lora": str(self._max_loras),
            "running_lora_adapters": ",".join(stats.lora_running),
            "waiting_lora_adapters": ",".join(stats.lora_waiting),
        }
        adapters = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters in use", labels=list(lora))
        adapters.add_metric(list(lora.values()), self._changed_s)
        yield adapters

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, documentation, labels=list(self._labels))
        gauge.add_metric(list(self._labels.values()), value)
        return gauge
