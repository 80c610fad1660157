"""Request and engine metrics, in the names operators' dashboards already know.

Request histograms follow the OpenTelemetry GenAI semantic conventions (names,
units, bucket boundaries, attributes); the engine's own state is in the
`modelserve.*` namespace. The server reports each request's outcome here; the
engine's gauges are read from its EngineStats when a reader collects, so the
engine itself records nothing and knows nothing of OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from modelserve.engine.request import EngineStats, StepRecord

# Bucket boundaries from the GenAI semantic conventions.
REQUEST_DURATION_BUCKETS_S = [0.01 * 2**i for i in range(14)]  # 0.01 ... 81.92
TIME_TO_FIRST_TOKEN_BUCKETS_S = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
]
TIME_PER_OUTPUT_TOKEN_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
TOKEN_USAGE_BUCKETS = [4**i for i in range(14)]  # 1, 4, 16 ... 67,108,864
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# OpenTelemetry histograms take no negative values, so the mean log-probability is exported
# negated: the mean negative log-likelihood per token, in nats (0 = certain; ln(vocab) = uniform).
TOKEN_NLL_BUCKETS = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0]

OPERATION = "text_completion"  # GenAI semconv's gen_ai.operation.name for a prompt; a chat's is CHAT_OPERATION
CHAT_OPERATION = "chat"
# Finish reasons that mean the caller did not get what it asked for.
FAILED_FINISH_REASONS = {"cancelled", "deadline_exceeded", "error"}


@dataclass(frozen=True)
class RequestOutcome:
    """How one generation request ended, as the server saw it."""

    input_tokens: int
    output_tokens: int
    finish_reason: str  # an engine FinishReason value, e.g. "length", "cancelled"
    queue_s: float
    time_to_first_token_s: float | None  # None when no token was produced
    total_s: float
    mean_logprob: float | None = None  # the output's mean token log-probability
    operation: str = OPERATION  # gen_ai.operation.name: CHAT_OPERATION for a chat's request


class GenerationMetrics:
    """The instruments, created once on a Meter; call the `request_*` methods as requests end."""

    def __init__(self, meter: Meter, model_id: str = "") -> None:
        self._base: dict[str, str] = {"gen_ai.operation.name": OPERATION}
        if model_id:
            self.set_model(model_id)
        self._stats: Callable[[], EngineStats] | None = None
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Time from a request's arrival to its end",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS_S,
        )
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time from arrival to the first output token",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS_S,
        )
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first (inter-token latency)",
            explicit_bucket_boundaries_advisory=TIME_PER_OUTPUT_TOKEN_BUCKETS_S,
        )
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per request",
            explicit_bucket_boundaries_advisory=TOKEN_USAGE_BUCKETS,
        )
        self.queue_time = meter.create_histogram(
            "modelserve.request.queue.duration",
            unit="s",
            description="Time from arrival to the first model step",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS_S,
        )
        self.output_tokens = meter.create_counter(
            "modelserve.output.tokens", unit="{token}", description="Tokens generated (its rate is throughput)"
        )
        self.finished = meter.create_counter(
            "modelserve.requests.finished", unit="{request}", description="Requests ended, by finish reason"
        )
        self.rejected = meter.create_counter(
            "modelserve.requests.rejected",
            unit="{request}",
            description="Requests refused before generating, by error.type (e.g. invalid_argument)",
        )
        meter.create_observable_gauge(
            "modelserve.requests.running",
            [self._observe("running")],
            unit="{request}",
            description="Requests generating now",
        )
        meter.create_observable_gauge(
            "modelserve.requests.waiting",
            [self._observe("waiting")],
            unit="{request}",
            description="Requests queued or being prefilled",
        )
        self.batch_size = meter.create_histogram(
            "modelserve.engine.batch_size",
            unit="{request}",
            description="Rows decoded together in one engine step",
            explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS,
        )
        self.step_duration = meter.create_histogram(
            "modelserve.engine.step.duration",
            unit="s",
            description="Time of an engine step's phase (modelserve.step.phase: prefill or decode)",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS_S,
        )
        self.token_nll = meter.create_histogram(
            "modelserve.response.token_nll",
            unit="1",
            description="Each response's mean token log-probability, negated (nats; lower = more confident)",
            explicit_bucket_boundaries_advisory=TOKEN_NLL_BUCKETS,
        )
        self._meter = meter
        meter.create_observable_gauge(
            "modelserve.kv_cache.usage",
            [self._observe("kv_usage")],
            unit="1",
            description="Fraction of the KV cache budget held by live tokens",
        )
        meter.create_observable_gauge(
            "modelserve.prefix_cache.tokens",
            [self._observe("prefix_cache_tokens")],
            unit="{token}",
            description="Prompt tokens the prefix cache holds (within its share of the KV budget)",
        )
        meter.create_observable_counter(
            "modelserve.prefix_cache.hit_tokens",
            [self._observe("prefix_cache_hit_tokens")],
            unit="{token}",
            description="Prompt tokens reused from the prefix cache instead of prefilled",
        )
        meter.create_observable_gauge(
            "modelserve.requests.waiting_tokens",
            [self._observe("waiting_tokens")],
            unit="{token}",
            description="Prompt + max_new_tokens of the requests queued for a batch slot (admission bound)",
        )
        meter.create_observable_gauge(
            "modelserve.engine.max_batch_size",
            [self._observe("max_batch_size")],
            unit="{request}",
            description="Rows the engine may decode together now (lowered after an out-of-memory step)",
        )

    def set_model(self, model_id: str) -> None:
        """Name the served model on every point from now on (known once it is loaded)."""
        self._base.update({"gen_ai.request.model": model_id, "gen_ai.response.model": model_id})

    def attach_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Read the engine's gauges from `stats` from now on."""
        self._stats = stats

    def request_finished(self, outcome: RequestOutcome) -> None:
        base = {**self._base, "gen_ai.operation.name": outcome.operation}
        attrs = dict(base)
        if outcome.finish_reason in FAILED_FINISH_REASONS:
            attrs["error.type"] = outcome.finish_reason
        self.duration.record(outcome.total_s, attrs)
        if outcome.time_to_first_token_s is not None:
            self.time_to_first_token.record(outcome.time_to_first_token_s, attrs)
            if outcome.output_tokens > 1:
                per_token = (outcome.total_s - outcome.time_to_first_token_s) / (outcome.output_tokens - 1)
                self.time_per_output_token.record(per_token, attrs)
        self.token_usage.record(outcome.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.token_usage.record(outcome.output_tokens, {**attrs, "gen_ai.token.type": "output"})
        self.queue_time.record(outcome.queue_s, attrs)
        if outcome.mean_logprob is not None:
            self.token_nll.record(-outcome.mean_logprob, attrs)
        self.output_tokens.add(outcome.output_tokens, base)
        self.finished.add(1, {**base, "finish_reason": outcome.finish_reason})

    def record_step(self, step: StepRecord) -> None:
        """The engine's per-step observer (called on the engine thread)."""
        if step.batch_size:
            self.batch_size.record(step.batch_size, self._base)
            self.step_duration.record(step.decode_s, {**self._base, "modelserve.step.phase": "decode"})
        if step.prefill_tokens:
            self.step_duration.record(step.prefill_s, {**self._base, "modelserve.step.phase": "prefill"})

    def attach_gpu_memory(self, read: Callable[[], tuple[int, int]]) -> None:
        """Export GPU memory (allocated, reserved) in bytes, as `read` reports it (CUDA only)."""

        def gauge(index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda options: [Observation(read()[index], self._base)]

        self._meter.create_observable_gauge(
            "modelserve.gpu.memory.allocated",
            [gauge(0)],
            unit="By",
            description="Bytes allocated by tensors on the GPU",
        )
        self._meter.create_observable_gauge(
            "modelserve.gpu.memory.reserved",
            [gauge(1)],
            unit="By",
            description="Bytes reserved by the GPU caching allocator",
        )

    def request_rejected(self, error_type: str, operation: str = OPERATION) -> None:
        self.rejected.add(1, {**self._base, "gen_ai.operation.name": operation, "error.type": error_type})

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self._stats is None:
                return []
            return [Observation(float(getattr(self._stats(), field)), self._base)]

        return callback
