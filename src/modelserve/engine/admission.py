"""Admission control: the bound on the waiting queue, and what the queue means for a deadline.

A request is counted from `submit()` (the event-loop thread) until it leaves the
waiting queue (the engine thread), under one lock, so a burst of submits between
two engine steps cannot overfill the queue. Past the limits a request is refused
at once with an estimate of when to retry; requests already admitted are not
touched, so they are not slowed down.

A deadline is judged against a lower bound: the prompt tokens queued ahead of the
request (at its priority or higher) plus its own, prefilled at the fastest rate
this engine has shown. Only a deadline shorter than that bound is refused: it is
clearly impossible, and the caller learns it now instead of at the deadline.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from modelserve.engine.request import DeadlineUnreachableError, QueueFullError, Request

# A prefill rate is trusted only from steps that prefilled at least this many tokens:
# a handful of tokens measures the step's fixed overhead, not the rate.
MIN_RATE_SAMPLE_TOKENS = 32
_THROUGHPUT_SMOOTHING = 0.1  # weight of the newest step in the throughput estimate
RETRY_AFTER_MIN_S = 0.05
RETRY_AFTER_MAX_S = 30.0


@dataclass(frozen=True)
class QueueLimits:
    max_requests: int  # requests waiting for a batch slot
    max_tokens: int  # prompt tokens of the waiting requests


class AdmissionControl:
    """Counts the waiting queue; refuses what does not fit in it or cannot meet its deadline."""

    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._requests = 0
        self._tokens = 0
        self._prompt_tokens_by_priority: Counter[int] = Counter()
        self._peak_prefill_tokens_per_s = 0.0
        self._tokens_per_s = 0.0

    def enter(self, request: Request, now_s: float) -> None:
        """Count `request` as waiting, or raise QueueFullError / DeadlineUnreachableError."""
        # A request needs KV blocks for its prompt to start; its output's blocks are taken as it grows.
        need, limits = len(request.prompt_ids), self.limits
        with self._lock:
            self._check_room()
            # An empty queue takes any request, so a limit below one request's size cannot lock it out.
            if self._requests and self._tokens + need > limits.max_tokens:
                self._refuse(
                    f"{self._tokens} prompt tokens are waiting and this request has {need}; "
                    f"the limit is {limits.max_tokens}"
                )
            if request.deadline_s is not None and self._peak_prefill_tokens_per_s > 0:
                ahead = sum(n for p, n in self._prompt_tokens_by_priority.items() if p >= request.priority)
                at_least_s = (ahead + len(request.prompt_ids)) / self._peak_prefill_tokens_per_s
                left_s = request.deadline_s - now_s
                if at_least_s > left_s:
                    raise DeadlineUnreachableError(
                        f"the deadline leaves {max(left_s, 0.0):.3f}s but the first token needs at least "
                        f"{at_least_s:.3f}s: {ahead} prompt tokens are queued ahead and this prompt has "
                        f"{len(request.prompt_ids)}, at this server's fastest prefill of "
                        f"{self._peak_prefill_tokens_per_s:.0f} tokens/s"
                    )
            self._requests += 1
            self._tokens += need
            self._prompt_tokens_by_priority[request.priority] += len(request.prompt_ids)

    def check(self) -> None:
        """Raise QueueFullError if no request could be queued now (a cheap test before any work)."""
        with self._lock:
            self._check_room()

    def leave(self, request: Request) -> None:
        """`request` left the waiting queue (admitted, aborted or expired)."""
        with self._lock:
            self._requests -= 1
            self._tokens -= len(request.prompt_ids)
            by_priority = self._prompt_tokens_by_priority
            by_priority[request.priority] -= len(request.prompt_ids)
            if not by_priority[request.priority]:
                del by_priority[request.priority]

    def observe_step(self, prefill_tokens: int, prefill_s: float, decoded_tokens: int, step_s: float) -> None:
        """Learn the engine's speed from one step (engine thread)."""
        if prefill_tokens >= MIN_RATE_SAMPLE_TOKENS and prefill_s > 0:
            self._peak_prefill_tokens_per_s = max(self._peak_prefill_tokens_per_s, prefill_tokens / prefill_s)
        if step_s > 0:
            rate = (prefill_tokens + decoded_tokens) / step_s
            old = self._tokens_per_s
            self._tokens_per_s = rate if old == 0 else old + _THROUGHPUT_SMOOTHING * (rate - old)

    def waiting(self) -> tuple[int, int]:
        """(requests, tokens) waiting now."""
        return self._requests, self._tokens

    def _check_room(self) -> None:
        if self._requests >= self.limits.max_requests:
            self._refuse(f"{self._requests} requests are waiting; the limit is {self.limits.max_requests}")

    def _refuse(self, why: str) -> None:
        # About the time the engine needs for one average waiting request's work.
        average_need = self._tokens / self._requests if self._requests else 0.0
        retry_s = average_need / self._tokens_per_s if self._tokens_per_s > 0 else 1.0
        retry_s = min(max(retry_s, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)
        raise QueueFullError(f"the server is at capacity: {why}; retry in about {retry_s:.2f}s", retry_s)
