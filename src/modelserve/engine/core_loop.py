"""The engine core's loop: take commands, step, emit; the same on a thread and in a process.

It blocks only when there is nothing to do, or when the frontend has not yet
acknowledged the step before last: the core never runs more than one step past
what the frontend has taken in, so a stop sequence the frontend finds costs at
most one extra step, and a lagging frontend slows the core instead of letting
outputs pile up. With no request to step, the core faults in KV memory ahead
of use, a little at a time, looking at its inbox between (core.fill()).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from modelserve.engine.core import EngineCore
from modelserve.engine.protocol import Ack, Command, Shutdown, StepOutput

# Steps the core may have emitted beyond the newest one the frontend acknowledged.
MAX_UNACKNOWLEDGED_STEPS = 1


def run_core_loop(
    core: EngineCore,
    take_commands: Callable[[bool], Iterable[Command]],
    emit: Callable[[StepOutput], None],
) -> None:
    """Run until a Shutdown command. `take_commands(block)` returns what has arrived (waiting for at least
    one when `block`, though it may return none, e.g. to let the caller check on its parent)."""
    emitted = acknowledged = 0
    while True:
        idle = not core.has_work()
        must_wait = (idle and not core.can_fill()) or emitted - acknowledged > MAX_UNACKNOWLEDGED_STEPS
        for command in take_commands(must_wait):
            if isinstance(command, Shutdown):
                return
            if isinstance(command, Ack):
                acknowledged = max(acknowledged, command.step)
            else:
                core.apply(command)
        if core.has_work() and emitted - acknowledged <= MAX_UNACKNOWLEDGED_STEPS:
            out = core.step()
            emitted = out.step
            emit(out)
        elif not core.has_work() and core.can_fill():
            core.fill()
