"""The policy: who waits, who runs, who is admitted next.

First come, first served, up to `max_batch_size` running rows.
"""

from __future__ import annotations

from collections import deque

from modelserve.engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row i of the batch cache is running[i]

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_aborted_waiting(self) -> list[Sequence]:
        """Remove waiting sequences that were aborted: they never touch the model."""
        aborted = [s for s in self.waiting if s.abort_reason is not None]
        if aborted:
            self.waiting = deque(s for s in self.waiting if s.abort_reason is None)
        return aborted

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill this step, in arrival order."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            admitted.append(self.waiting.popleft())
        return admitted

    def drop_finished(self) -> list[int]:
        """Remove finished rows from `running`; return the rows that stay, in order."""
        keep = [i for i, s in enumerate(self.running) if s.finish is None]
        if len(keep) != len(self.running):
            self.running = [self.running[i] for i in keep]
        return keep
