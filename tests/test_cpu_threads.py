"""The engine core's thread count: from the affinity mask and the cgroup CPU quota, read from fake
/proc/self and cgroup files; the user's OMP_NUM_THREADS wins. And its OpenMP wait policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelserve.engine.cgroups import cgroup_memory_limit, cgroup_quota_cpus
from modelserve.engine.cpu_threads import WAIT_POLICY, CoreThreads, choose_threads, passive_omp_waits

LARGE = 124_000_000  # GPT-2-small: every usable CPU
SMALL = 1_000_000  # under 20M: one CPU left to the frontend


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo.format(root=tmp_path))
    return proc


def write(directory: Path, **files: str) -> None:
    """Cgroup files, named as keywords: the first "_" stands for the dot (cpu_max is cpu.max)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


V2_MOUNT = "30 23 0:26 / {root}/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "32 31 0:29 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n"
)


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT)
    write(tmp_path / "cgroup/kubepods/pod1/ctr", cpu_max="150000 100000")
    assert cgroup_quota_cpus(proc) == 1.5


def test_v2_max_is_no_quota(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/user.slice\n", V2_MOUNT)
    write(tmp_path / "cgroup/user.slice", cpu_max="max 100000")
    assert cgroup_quota_cpus(proc) is None


def test_v2_an_ancestors_tighter_quota_applies(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT)
    write(tmp_path / "cgroup/kubepods/pod1", cpu_max="50000 100000")
    write(tmp_path / "cgroup/kubepods/pod1/ctr", cpu_max="max 100000")
    assert cgroup_quota_cpus(proc) == 0.5


def test_v2_in_a_cgroup_namespace_the_mount_root_is_the_container(tmp_path: Path) -> None:
    # A container's own cgroup mounted as the root: /proc/self/cgroup says "/", its cpu.max is at the mount.
    proc = fake_proc(tmp_path, "0::/\n", V2_MOUNT)
    write(tmp_path / "cgroup", cpu_max="200000 100000")
    assert cgroup_quota_cpus(proc) == 2.0


def test_v1_quota_under_a_mount_of_the_containers_cgroup(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: the path is the host's, the mount shows that cgroup as its root.
    mounts = "32 31 0:29 /docker/abc {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    proc = fake_proc(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", mounts)
    write(tmp_path / "cpu,cpuacct", cpu_cfs_quota_us="250000", cpu_cfs_period_us="100000")
    assert cgroup_quota_cpus(proc) == 2.5


def test_v1_minus_one_is_no_quota_and_other_controllers_are_not_read(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "5:memory:/a\n4:cpu,cpuacct:/a\n", V1_MOUNTS)
    write(tmp_path / "cpu,cpuacct/a", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write(tmp_path / "memory/a", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")  # not the cpu hierarchy
    assert cgroup_quota_cpus(proc) is None


def test_no_cgroup_files_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota_cpus(fake_proc(tmp_path, "0::/gone\n", V2_MOUNT)) is None
    assert cgroup_quota_cpus(tmp_path / "no-proc") is None


def test_a_mount_of_another_cgroup_is_not_read(tmp_path: Path) -> None:
    mounts = "30 23 0:26 /other {root}/cgroup rw - cgroup2 cgroup2 rw\n"
    proc = fake_proc(tmp_path, "0::/mine\n", mounts)
    write(tmp_path / "cgroup", cpu_max="100000 100000")
    assert cgroup_quota_cpus(proc) is None


def test_an_escaped_mount_point(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n", "30 23 0:26 / {root}/my\\040cgroup rw - cgroup2 cgroup2 rw\n")
    write(tmp_path / "my cgroup", cpu_max="300000 100000")
    assert cgroup_quota_cpus(proc) == 3.0


def choose(
    parameters: int = LARGE,
    affinity: int = 2,
    quota: float | None = None,
    torch_threads: int = 64,
    environ: dict[str, str] | None = None,
    on_cpu: bool = True,
) -> CoreThreads:
    return choose_threads(
        on_cpu=on_cpu,
        parameters=parameters,
        environ=environ or {},
        torch_threads=torch_threads,
        affinity_cpus=affinity,
        quota_cpus=quota,
    )


@pytest.mark.parametrize(
    ("parameters", "affinity", "quota", "threads"),
    [
        (LARGE, 2, None, 2),
        (LARGE, 8, 1.5, 1),  # a fractional quota rounds down: the frontend gets the fraction
        (LARGE, 8, 2.5, 2),
        (LARGE, 2, 4.0, 2),  # the affinity mask is the tighter
        (LARGE, 64, 0.5, 1),
        (SMALL, 2, None, 1),  # one left to the frontend
        (SMALL, 1, None, 1),  # ...unless there is only one
        (SMALL, 64, 3.0, 2),
    ],
)
def test_threads_follow_the_usable_cpus(parameters: int, affinity: int, quota: float | None, threads: int) -> None:
    assert choose(parameters, affinity, quota).threads == threads


def test_affinity_smaller_than_cpu_count_is_what_counts() -> None:
    # torch's default is the machine's physical cores (here 8), blind to the affinity mask.
    assert choose(affinity=3, torch_threads=8) == CoreThreads(3, "affinity allows 3 CPUs -> 3")


def test_the_reason_names_the_quota_and_the_frontends_cpu() -> None:
    assert choose(SMALL, affinity=4, quota=3.5) == CoreThreads(
        2,
        "affinity allows 4 CPUs, cgroup quota 3.5 CPUs -> 3, less one for the frontend (a model under 20M parameters)",
    )


def test_torchs_default_of_physical_cores_is_never_raised() -> None:
    assert choose(affinity=16, quota=12.0, torch_threads=8) == CoreThreads(
        8, "affinity allows 16 CPUs, cgroup quota 12 CPUs, torch's default 8 (physical cores) -> 8"
    )


def test_on_an_accelerator_a_small_model_keeps_every_cpu() -> None:
    assert choose(SMALL, affinity=4, on_cpu=False).threads == 4


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_the_users_thread_setting_wins(variable: str) -> None:
    # torch has sized its pool from the variable already: that size stays, whatever the CPUs.
    chosen = choose(SMALL, affinity=2, quota=1.0, torch_threads=3, environ={variable: "3"})
    assert chosen == CoreThreads(3, f"{variable}=3 set by the user")


def test_passive_waits_while_the_core_starts_then_the_environment_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    with passive_omp_waits():
        assert os.environ[WAIT_POLICY] == "PASSIVE"
    assert WAIT_POLICY not in os.environ


def test_the_users_wait_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    with passive_omp_waits():
        assert os.environ[WAIT_POLICY] == "ACTIVE"
    assert os.environ[WAIT_POLICY] == "ACTIVE"


def test_memory_limit_v2_tightest_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT)
    write(tmp_path / "cgroup/kubepods/pod1", memory_max=str(2 << 30))
    write(tmp_path / "cgroup/kubepods/pod1/ctr", memory_max="max")
    assert cgroup_memory_limit(proc) == 2 << 30
    write(tmp_path / "cgroup/kubepods/pod1", memory_max="max")
    assert cgroup_memory_limit(proc) is None


def test_memory_limit_v1_and_its_no_limit_number(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "5:memory:/a\n4:cpu,cpuacct:/a\n", V1_MOUNTS)
    write(tmp_path / "memory/a", memory_limit_in_bytes=str(512 << 20))
    write(tmp_path / "cpu,cpuacct/a", memory_limit_in_bytes=str(1 << 20))  # not the memory hierarchy
    assert cgroup_memory_limit(proc) == 512 << 20
    write(tmp_path / "memory/a", memory_limit_in_bytes="9223372036854771712")  # v1's "no limit"
    assert cgroup_memory_limit(proc) is None
    assert cgroup_memory_limit(tmp_path / "no-proc") is None
