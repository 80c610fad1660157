"""What this process's cgroup allows it: a CPU quota (a Kubernetes CPU limit) and a memory limit.

Each is read as the kernel applies it: the tightest of the process's cgroup and its ancestors, v2
`cpu.max` / `memory.max` or v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us` / `memory.limit_in_bytes`,
under the mounts /proc/self/mountinfo names (so a cgroup namespace, which shows a container its own
cgroup as the root, reads the container's own). Written by hand: psutil reads neither, and the few
lines below are the whole of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar

PROC_SELF = Path("/proc/self")
NO_V1_MEMORY_LIMIT = 1 << 62  # v1 says "no limit" with PAGE_COUNTER_MAX pages in bytes, about 2**63
T = TypeVar("T", int, float)


def cgroup_quota_cpus(proc_self: Path = PROC_SELF) -> float | None:
    """The CPUs per second the cgroup quota lets this process's cgroup use (None: no quota), read from
    `proc_self`/cgroup and `proc_self`/mountinfo and the cgroup files under the mount points these name."""
    return _tightest(proc_self, "cpu", _quota_v2, _quota_v1)


def cgroup_memory_limit(proc_self: Path = PROC_SELF) -> int | None:
    """The bytes of memory this process's cgroup may use (None: no limit), read as cgroup_quota_cpus()."""
    return _tightest(proc_self, "memory", _memory_v2, _memory_v1)


def _tightest(
    proc_self: Path, controller: str, v2: Callable[[Path], T | None], v1: Callable[[Path], T | None]
) -> T | None:
    """The smallest value `v2` or `v1` reads in the directories of this process's cgroup and its ancestors
    (None: none sets one)."""
    try:
        memberships = (proc_self / "cgroup").read_text().splitlines()
        mounts = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return None
    values = [
        value
        for directories, is_v2 in _cgroups(memberships, mounts, controller)
        for directory in directories
        if (value := (v2 if is_v2 else v1)(directory)) is not None
    ]
    return min(values, default=None)


def _cgroups(memberships: list[str], mounts: list[str], controller: str) -> list[tuple[list[Path], bool]]:
    """Each mounted cgroup hierarchy with `controller`: the directories of this process's cgroup and its
    ancestors there (those the mount shows), and whether the hierarchy is v2."""
    paths: dict[str, PurePosixPath] = {}  # the process's cgroup in the v2 hierarchy, and in v1's with it
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            paths["cgroup2"] = PurePosixPath(path)
        elif controller in controllers.split(","):
            paths["cgroup"] = PurePosixPath(path)
    found: list[tuple[list[Path], bool]] = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        fstype, _, options = fields[fields.index("-") + 1 :][:3]
        if fstype not in paths or (fstype == "cgroup" and controller not in options.split(",")):
            continue
        # A mount may show only part of the hierarchy (a container's own cgroup, as its root): the
        # process's cgroup is then found below the mount's root, and ancestors above it are not shown.
        root, mount_point = PurePosixPath(_unescape(fields[3])), Path(_unescape(fields[4]))
        if not paths[fstype].is_relative_to(root):
            continue
        parts = paths[fstype].relative_to(root).parts
        directories = [mount_point.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
        found.append((directories, fstype == "cgroup2"))
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


def _memory_v2(directory: Path) -> int | None:
    """cgroup v2 `memory.max`: bytes, or "max" for no limit."""
    try:
        limit = (directory / "memory.max").read_text().strip()
        return None if limit == "max" else int(limit)
    except (OSError, ValueError):
        return None


def _memory_v1(directory: Path) -> int | None:
    """cgroup v1 `memory.limit_in_bytes`; the kernel writes "no limit" as a number near 2**63."""
    try:
        limit = int((directory / "memory.limit_in_bytes").read_text())
        return None if limit >= NO_V1_MEMORY_LIMIT else limit
    except (OSError, ValueError):
        return None
