"""Which LoRA adapter each resident slot holds, and how many running sequences use it: the scheduler's
bookkeeping, plain Python like the block manager's (the slots' tensors are the runner's, lora.py).

Slots are 1..max_loras (0 is the bare base model). An adapter that is not resident takes the least recently
used slot that no running sequence uses; while every slot is in use, a request for another adapter waits.
"""

from __future__ import annotations

from collections import OrderedDict


class LoraSlots:
    """Which adapter each slot holds and how many running sequences use it; the least recently used idle
    slot is the one an adapter that is not resident takes."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: dict[str, int] = {}
        self._users: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(1, max_loras + 1))
        self._holder: dict[int, str] = {}

    def acquire(self, name: str) -> tuple[int, bool] | None:
        """The slot for `name` and whether its weights must be loaded into it; None while every slot is in use."""
        slot = self._slot_of.get(name)
        fresh = slot is None
        if slot is None:
            if not self._idle:
                return None
            slot = next(iter(self._idle))
            old = self._holder.pop(slot, None)
            if old is not None:
                del self._slot_of[old]
            self._slot_of[name], self._holder[slot] = slot, name
        self._idle.pop(slot, None)
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot, fresh

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if not self._users[slot]:
            del self._users[slot]
            self._idle[slot] = None  # most recently used last

    def forget(self, name: str) -> None:
        """An adapter was unloaded: its slot is no longer found under its name (its users finish on it)."""
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            del self._holder[slot]
            if slot in self._idle:
                self._idle.move_to_end(slot, last=False)  # reused first

    def in_use(self) -> dict[str, int]:
        """Adapters that running sequences use, and how many each."""
        return {self._holder[slot]: users for slot, users in self._users.items() if slot in self._holder}
