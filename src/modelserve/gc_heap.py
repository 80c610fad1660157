"""Keeping a server process's start-up heap out of the cyclic garbage collector.

A process that has imported torch and transformers and loaded a model tracks about 350,000 objects,
and a full (oldest-generation) collection walks every one: 170 ms on this project's 2-CPU test machine.
CPython runs one whenever the objects that have survived into the oldest generation since the last
full collection outnumber a quarter of those already there, so a long-running server stops for that
long every so often, in the frontend (every open stream waits) or in the engine core (every running
row waits a step). Nearly all of those objects live as long as the process (modules, classes,
functions, the model's modules and parameters), so once a process is ready they are moved into the
permanent generation (`gc.freeze`), which collections skip; a full collection then walks only what
was made while serving. vLLM does the same in its engine core and its API server.

Reference counting still frees frozen objects as before; only a reference cycle made before the
freeze and dropped after it is never reclaimed, which start-up code does not leave behind in any
amount that matters.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> None:
    """Collect what start-up left as garbage, then freeze the rest; say how much, naming `process`."""
    gc.collect()
    gc.freeze()
    log.info("%s: %d start-up objects frozen out of the cyclic garbage collector", process, gc.get_freeze_count())
