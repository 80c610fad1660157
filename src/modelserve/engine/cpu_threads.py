"""How many threads the engine core's torch uses, and why: from the CPUs this process may really use.

os.cpu_count() counts the machine's CPUs, not this process's: a CPU affinity mask (taskset, a cpuset)
or a cgroup CPU quota (a Kubernetes CPU limit) can give it fewer, and torch's threads split every
operation evenly, so one thread more than there are CPUs waits for its turn at every step. The quota
is read as the kernel applies it (cgroups.py).
And how those threads wait between operations: asleep, not spinning (passive_omp_waits).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from modelserve.engine.cgroups import cgroup_quota_cpus

SMALL_MODEL_PARAMETERS = 20_000_000  # below this, a CPU core leaves one CPU to the frontend
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch sizes its pool from
WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"  # libgomp's (torch's wheels load it): spins before a waiting thread sleeps


@dataclass(frozen=True)
class CoreThreads:
    """The engine core's torch thread count and the reason, for its log line."""

    threads: int
    reason: str


def choose_threads(
    *,
    on_cpu: bool,
    parameters: int,
    environ: Mapping[str, str],
    torch_threads: int,
    affinity_cpus: int,
    quota_cpus: float | None,
) -> CoreThreads:
    """The thread count for a model of `parameters` on CPU or an accelerator, given what the process may use.

    `torch_threads` is torch's own choice: from the user's OMP_NUM_THREADS or MKL_NUM_THREADS, which win,
    or else its default, the machine's physical cores (hyperthreads slow its matrix products), which this
    only lowers, to the CPUs the affinity mask and the quota allow. A fractional quota rounds down (to at
    least 1): the frontend shares the quota and gets the fraction. Measured on 2 CPUs under a 1.5-CPU
    quota, GPT-2-small at 32 streams served 1.3-1.6x the tok/s with one thread that it served with two,
    and no less at one stream or beside a busy neighbour.

    A small model on CPU leaves one CPU to the frontend: its step is all dispatch, so another thread only
    contends with the frontend. Measured on 2 CPUs: a tiny model served 1.5x faster with one thread,
    GPT-2-small (124M) 1.85x faster with two.
    """
    explicit = [f"{name}={environ[name]}" for name in THREAD_VARIABLES if name in environ]
    if explicit:
        return CoreThreads(torch_threads, f"{', '.join(explicit)} set by the user")
    limits = [(affinity_cpus, f"affinity allows {affinity_cpus} CPUs")]
    if quota_cpus is not None:
        limits.append((max(1, math.floor(quota_cpus)), f"cgroup quota {quota_cpus:g} CPUs"))
    if torch_threads < min(limit for limit, _ in limits):
        limits.append((torch_threads, f"torch's default {torch_threads} (physical cores)"))
    usable = min(limit for limit, _ in limits)
    allowed = f"{', '.join(why for _, why in limits)} -> {usable}"
    if on_cpu and parameters < SMALL_MODEL_PARAMETERS and usable > 1:
        return CoreThreads(usable - 1, f"{allowed}, less one for the frontend (a model under 20M parameters)")
    return CoreThreads(usable, allowed)


def core_threads(*, on_cpu: bool, parameters: int, torch_threads: int) -> CoreThreads:
    """choose_threads() for this process, from its environment, affinity mask and cgroups."""
    return choose_threads(
        on_cpu=on_cpu,
        parameters=parameters,
        environ=os.environ,
        torch_threads=torch_threads,
        affinity_cpus=len(os.sched_getaffinity(0)),
        quota_cpus=cgroup_quota_cpus(),
    )


@contextlib.contextmanager
def passive_omp_waits() -> Iterator[None]:
    """OMP_WAIT_POLICY=PASSIVE in this process's environment while the block runs (unless the user set a
    policy): around starting the engine core process, which inherits it. OpenMP reads it once, as torch
    loads it, which is before the core's own code runs.

    By default a torch thread that has done its share of an operation spins before it sleeps. Beside a
    busy neighbour that collapses: a spinning thread uses up its fair share of the CPU it shares, so the
    kernel runs the neighbour when the next operation needs that thread, and a spinning partner keeps the
    other CPU from ever falling idle and taking the delayed thread over. A passive thread sleeps at once:
    a woken sleeper goes before the neighbour, and an idle CPU pulls a waiting thread across. Measured on
    2 CPUs with a busy loop on one (bench/neighbour_bench.py --spinning), GPT-2-small at 1 and 32 streams:
    spinning 28.7 -> 11.7 and 164.6 -> 6.5 tok/s, passive 26.2 -> 26.5 and 153.9 -> 65.5; quiet, passive
    costs 6-9%.

    A short spin was measured and not taken: libgomp's GOMP_SPINCOUNT with this policy (an AMD Zen 4, 2 CPUs,
    GPT-2-small bf16; bench/neighbour_bench.py with OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT set, against
    GOMP_SPINCOUNT=0). 10,000 spins (about 0.1 ms) served 40.3 against 32.8 tok/s quiet at one stream, but
    14.3 against 24.8 beside the busy neighbour (0.35 of quiet, the collapse again); 1,000 served 37.2
    against 35.0 at one stream and 410.6 against 421.2 at 32, a wash. A machine with no neighbours may set
    GOMP_SPINCOUNT=10000 itself: it passes through to the core untouched, as does a user's OMP_WAIT_POLICY.
    """
    if WAIT_POLICY in os.environ:
        yield
        return
    os.environ[WAIT_POLICY] = "PASSIVE"
    try:
        yield
    finally:
        del os.environ[WAIT_POLICY]
