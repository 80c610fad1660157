"""How many threads the engine core's torch uses, and why: from the CPUs this process may really use.

os.cpu_count() counts the machine's CPUs, not this process's: a CPU affinity mask (taskset, a cpuset)
or a cgroup CPU quota (a Kubernetes CPU limit) can give it fewer, and torch's threads split every
operation evenly, so one thread more than there are CPUs waits for its turn at every step. The quota
is read as the kernel applies it: the tightest of the process's cgroup and its ancestors, v2 `cpu.max`
or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, under the mounts /proc/self/mountinfo names (so a
cgroup namespace, which shows a container its own cgroup as the root, reads the container's own).
And how those threads wait between operations: asleep, not spinning (passive_omp_waits).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SMALL_MODEL_PARAMETERS = 20_000_000  # below this, a CPU core leaves one CPU to the frontend
PROC_SELF = Path("/proc/self")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch sizes its pool from
WAIT_POLICY = "OMP_WAIT_POLICY"


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
    """
    if WAIT_POLICY in os.environ:
        yield
        return
    os.environ[WAIT_POLICY] = "PASSIVE"
    try:
        yield
    finally:
        del os.environ[WAIT_POLICY]


def cgroup_quota_cpus(proc_self: Path = PROC_SELF) -> float | None:
    """The CPUs per second the cgroup quota lets this process's cgroup use (None: no quota), read from
    `proc_self`/cgroup and `proc_self`/mountinfo and the cgroup files under the mount points these name."""
    try:
        memberships = (proc_self / "cgroup").read_text().splitlines()
        mounts = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return None
    quotas = [
        quota
        for directories, quota_of in _cpu_cgroups(memberships, mounts)
        for directory in directories
        if (quota := quota_of(directory)) is not None
    ]
    return min(quotas, default=None)


def _cpu_cgroups(memberships: list[str], mounts: list[str]) -> list[tuple[list[Path], Callable[[Path], float | None]]]:
    """Each mounted cgroup hierarchy with the CPU controller: the directories of this process's cgroup and
    its ancestors there (those the mount shows), with the reader of that hierarchy's quota files."""
    paths: dict[str, PurePosixPath] = {}  # the process's cgroup in the v2 hierarchy, and in v1's with "cpu"
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            paths["cgroup2"] = PurePosixPath(path)
        elif "cpu" in controllers.split(","):
            paths["cgroup"] = PurePosixPath(path)
    found: list[tuple[list[Path], Callable[[Path], float | None]]] = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        fstype, _, options = fields[fields.index("-") + 1 :][:3]
        if fstype not in paths or (fstype == "cgroup" and "cpu" not in options.split(",")):
            continue
        # A mount may show only part of the hierarchy (a container's own cgroup, as its root): the
        # process's cgroup is then found below the mount's root, and ancestors above it are not shown.
        root, mount_point = PurePosixPath(_unescape(fields[3])), Path(_unescape(fields[4]))
        if not paths[fstype].is_relative_to(root):
            continue
        parts = paths[fstype].relative_to(root).parts
        directories = [mount_point.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
        found.append((directories, _quota_v2 if fstype == "cgroup2" else _quota_v1))
    return found


def _quota_v2(directory: Path) -> float | None:
    """cgroup v2 `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for no quota."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _quota_v1(directory: Path) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`; a quota of -1 is none."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _unescape(field: str) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
