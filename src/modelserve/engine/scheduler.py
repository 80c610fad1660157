"""The policy: who waits, who is prefilled, who decodes, who is admitted next.

Highest priority first, then first come, first served. A waiting request is
admitted when a row is free and the KV budget can hold its whole sequence
(prompt + max_new_tokens); the head of the queue is never overtaken, so a
large request is not starved by small ones of its priority. Running requests
are never preempted. Prefill is budgeted per step (`prefill_chunk_tokens`): a long prompt is
split over several steps, and running streams keep getting a token every step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from modelserve.engine.request import FinishReason
from modelserve.engine.sequence import Sequence

IDLE_PREFILL_FACTOR = 8


class Scheduler:
    def __init__(self, max_batch_size: int, prefill_chunk_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: list[Sequence] = []  # in admission order: highest priority, then oldest
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i] decodes in KV pool row i

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_admission_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def expire(self, now_s: float) -> None:
        """Mark every sequence whose deadline has passed; the step then ends it like an abort."""
        for seq in (*self.waiting, *self.prefilling, *self.running):
            deadline = seq.request.deadline_s
            if deadline is not None and now_s >= deadline and seq.abort_reason is None and seq.finish is None:
                seq.abort_reason = FinishReason.DEADLINE_EXCEEDED

    def take_aborted(self) -> tuple[list[Sequence], list[Sequence]]:
        """Remove aborted sequences that hold no pool row: (were waiting, were prefilling)."""
        waiting = [s for s in self.waiting if s.abort_reason is not None]
        prefilling = [s for s in self.prefilling if s.abort_reason is not None]
        if waiting:
            self.waiting = [s for s in self.waiting if s.abort_reason is None]
        if prefilling:
            self.prefilling = [s for s in self.prefilling if s.abort_reason is None]
        return waiting, prefilling

    def admit(self, fits: Callable[[list[int]], bool]) -> list[Sequence]:
        """Move waiting sequences to prefilling while rows and the KV budget allow."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            head = self.waiting[0]
            if not fits([s.need for s in self.prefilling] + [head.need]):
                break
            self.prefilling.append(self.waiting.pop(0))
            admitted.append(head)
        return admitted

    def prefill_plan(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens) to prefill this step, oldest first, within the per-step budget.

        The budget bounds how long running streams wait for their next token; with no
        stream running nobody waits, and a larger chunk gives the first token sooner.
        """
        plan: list[tuple[Sequence, int]] = []
        budget = self.prefill_chunk_tokens * (1 if self.running else IDLE_PREFILL_FACTOR)
        for seq in self.prefilling:
            if budget <= 0:
                break
            n = min(seq.prompt_left, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def finished_rows(self) -> list[int]:
        """Rows of running sequences that have finished, highest first (the order to free them in)."""
        return [i for i in range(len(self.running) - 1, -1, -1) if self.running[i].finish is not None]

    def remove_row(self, row: int) -> None:
        """Mirror of KVPool.remove: the last row takes the freed one's place."""
        last = self.running.pop()
        if row < len(self.running):
            self.running[row] = last


def _admission_order(seq: Sequence) -> tuple[int, int]:
    return (-seq.request.priority, seq.key)  # keys grow with arrival
