"""One request's telemetry: its span's story, its metrics and its log line.

The servicer feeds each engine event to an OutcomeTracker and closes it when the
handler ends; the tracker reports exactly once, also for a request that ended
early with no finish event. It knows no gRPC: the handler tells it why a request
ended early.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace

from modelserve.engine.request import Request, StreamEvent
from modelserve.telemetry.metrics import OPERATION, GenerationMetrics, RequestOutcome

log = logging.getLogger("modelserve.server.grpc.servicer")  # the request log keeps its logger name


class OutcomeTracker:
    """Follows one request's events; tells its span the story (queued, admitted, first token,
    finished) and the metrics how it ended, also when it ends early. No prompt or output text."""

    def __init__(
        self,
        metrics: GenerationMetrics | None,
        request: Request,
        prompt: str | None,
        trace_content: bool = False,
        log_content: bool = False,
        operation: str = OPERATION,
    ) -> None:
        """`prompt` is given only when the operator turned content tracing or logging on; `operation` is the
        request's gen_ai.operation.name (a chat's is "chat")."""
        self._metrics = metrics
        self._operation = operation
        self._request_id = request.request_id
        self._prompt = prompt
        self._trace_content, self._log_content = trace_content, log_content
        self._output: list[str] = []
        self._span = trace.get_current_span()  # the RPC's span, from the tracing interceptor
        input_tokens = len(request.prompt_ids)
        self._input_tokens = input_tokens
        self._start_s = time.monotonic()
        self._start_ns = time.time_ns()
        self._first_token_s: float | None = None
        self._output_tokens = 0
        self._reported = False
        self._span.set_attribute("gen_ai.operation.name", operation)
        self._span.add_event("queued", {"gen_ai.usage.input_tokens": input_tokens})

    def saw(self, event: StreamEvent) -> None:
        if event.token_ids and self._first_token_s is None:
            self._first_token_s = time.monotonic() - self._start_s
            self._span.add_event("first_token")
        self._output_tokens = event.output_tokens
        if self._prompt is not None:
            self._output.append(event.text)
        if event.finish is not None and not self._reported:
            timings = event.finish.timings
            ttft = timings.time_to_first_token_s if event.output_tokens else None
            self._report(event.finish.reason.value, timings.queue_s, ttft, timings.total_s, event.finish.mean_logprob)

    def close(self, ended_early_reason: str) -> None:
        """The handler is ending: a request with no finish event ended early for `ended_early_reason`
        (the caller cancelled, went away, or its deadline passed)."""
        if self._reported:
            return
        reason = ended_early_reason
        elapsed = time.monotonic() - self._start_s
        self._report(reason, self._first_token_s or elapsed, self._first_token_s, elapsed)

    def _report(
        self, reason: str, queue_s: float, ttft_s: float | None, total_s: float, mean_logprob: float | None = None
    ) -> None:
        self._reported = True
        if not self._span.is_recording():  # the tracing interceptor already ended it (a cancelled call)
            self._span = trace.INVALID_SPAN
        self._span.add_event("admitted", timestamp=self._start_ns + int(queue_s * 1e9))
        self._span.add_event("finished", {"gen_ai.response.finish_reasons": [reason]})
        self._span.set_attributes(
            {
                "gen_ai.usage.input_tokens": self._input_tokens,
                "gen_ai.usage.output_tokens": self._output_tokens,
                "gen_ai.response.finish_reasons": [reason],
            }
        )
        if self._prompt is not None and self._trace_content:
            self._span.set_attributes({"gen_ai.prompt": self._prompt, "gen_ai.completion": "".join(self._output)})
        if self._log_content or log.isEnabledFor(logging.DEBUG):
            self._log(reason, total_s)
        if self._metrics is not None:
            self._metrics.request_finished(
                RequestOutcome(
                    self._input_tokens,
                    self._output_tokens,
                    reason,
                    queue_s,
                    ttft_s,
                    total_s,
                    mean_logprob,
                    self._operation,
                )
            )

    def _log(self, reason: str, total_s: float) -> None:
        """One line per request: ids and counts at DEBUG; prompt and output only when the operator asked."""
        summary = "request %s: %s after %.3fs, %d prompt tokens, %d output tokens"
        args: tuple[object, ...] = (self._request_id, reason, total_s, self._input_tokens, self._output_tokens)
        if self._log_content and self._prompt is not None:
            log.info(summary + ", prompt %r, output %r", *args, self._prompt, "".join(self._output))
        else:
            log.debug(summary, *args)
