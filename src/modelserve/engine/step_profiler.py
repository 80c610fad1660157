"""torch's profiler over the engine core's steps, on an operator's request (vLLM's StartProfile and
StopProfile), writing a Chrome trace (chrome://tracing, Perfetto) to the path the frontend chose.

It runs where the steps run, in the core process, so the trace shows the forward, the sampler and the
scheduler as they are in service. Started `start_step` steps after the request; stopped by StopProfile,
or by itself after `num_steps` steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from modelserve.engine.protocol import PROFILE_MEMORY, StartProfile

log = logging.getLogger("modelserve.engine")

ACTIVITIES = {"CPU": ProfilerActivity.CPU, "GPU": ProfilerActivity.CUDA, "CUDA": ProfilerActivity.CUDA}


class StepProfiler:
    """At most one profile at a time; a new StartProfile ends the one before (the frontend refuses that)."""

    def __init__(self) -> None:
        self._asked: StartProfile | None = None  # waiting for its first step
        self._wait_steps = 0
        self._running: profile | None = None
        self._path = ""
        self._steps_left = 0  # 0: until StopProfile

    def start(self, asked: StartProfile) -> None:
        self.stop()
        self._asked, self._wait_steps = asked, asked.start_step
        if not self._wait_steps:
            self._begin()

    def _begin(self) -> None:
        asked = self._asked
        assert asked is not None
        activities = [ACTIVITIES[name] for name in asked.activities if name in ACTIVITIES]
        if not activities:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        running = profile(
            activities=activities,
            record_shapes=asked.record_shapes,
            with_stack=asked.with_stack,
            profile_memory=PROFILE_MEMORY in asked.activities,
        )
        running.start()
        self._running, self._path, self._steps_left, self._asked = running, asked.path, asked.num_steps, None
        log.info("profiling the engine's steps into %s", self._path)

    def step(self) -> None:
        """After each engine step: start a profile that was waiting for it, end one that has its steps."""
        if self._asked is not None:
            self._wait_steps -= 1
            if self._wait_steps <= 0:
                self._begin()
            return
        if self._running is None:
            return
        self._running.step()
        if self._steps_left:
            self._steps_left -= 1
            if not self._steps_left:
                self.stop()

    def stop(self) -> None:
        """End the profile (if one runs) and write its trace; a profile still waiting to start is dropped."""
        self._asked = None
        running, self._running = self._running, None
        if running is None:
            return
        running.stop()
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        running.export_chrome_trace(self._path)
        log.info("profile written to %s", self._path)
