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

import torch

from modelserve.engine.kv_cache import KVPool, PrefillBuffer
from modelserve.engine.request import FinishReason
from modelserve.engine.sequence import Sequence

IDLE_PREFILL_FACTOR = 8


class Scheduler:
    """Owns the three queues; the engine core changes them only through these methods."""

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

    def take_aborted(self) -> list[Sequence]:
        """Remove and return the aborted sequences that hold no pool row (waiting or prefilling)."""
        aborted = [s for s in (*self.waiting, *self.prefilling) if s.abort_reason is not None]
        if aborted:
            self.waiting = [s for s in self.waiting if s.abort_reason is None]
            self.prefilling = [s for s in self.prefilling if s.abort_reason is None]
            for seq in aborted:
                seq.prefill = None
        return aborted

    def admit(self, pool: KVPool) -> list[Sequence]:
        """Move waiting sequences to prefilling while rows and the KV budget allow; each gets its buffer."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            head = self.waiting[0]
            if not pool.fits([s.need for s in self.prefilling] + [head.need]):
                break
            self.prefilling.append(self.waiting.pop(0))
            head.prefill = PrefillBuffer(pool.shape, len(head.request.prompt_ids))
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

    def start_decoding(self, seq: Sequence, pool: KVPool, first_token: torch.Tensor) -> None:
        """A prefilled sequence takes the next pool row, to decode from `first_token` on."""
        assert seq.prefill is not None
        self.prefilling.remove(seq)
        seq.row = pool.add(seq.prefill, seq.need, first_token)
        seq.prefill = None
        self.running.append(seq)

    def drop_prefill(self, seq: Sequence) -> None:
        """A prefilling sequence ends before it decodes (it failed, or its first token ended it)."""
        self.prefilling.remove(seq)
        seq.prefill = None

    def retire_finished(self, pool: KVPool) -> None:
        """Free the rows of finished sequences; the last row fills each gap, in the pool as here."""
        for row in range(len(self.running) - 1, -1, -1):
            seq = self.running[row]
            if seq.finish is None:
                continue
            pool.remove(row)
            last = self.running.pop()
            if row < len(self.running):
                self.running[row] = last
                last.row = row
            seq.row = None

    def drop_running(self, pool: KVPool) -> list[Sequence]:
        """After a failed decode step every row is suspect: take them all out, free the pool."""
        dropped, self.running = self.running, []
        for seq in dropped:
            seq.row = None
        pool.clear()
        return dropped

    def drop_all(self, pool: KVPool) -> list[Sequence]:
        """The loop is ending: every sequence, in any queue."""
        every = [*self.waiting, *self.prefilling, *self.drop_running(pool)]
        self.waiting, self.prefilling = [], []
        return every


def _admission_order(seq: Sequence) -> tuple[int, int]:
    return (-seq.request.priority, seq.key)  # keys grow with arrival
