"""How many CPUs this process may use: its CPU set, and a container's CPU quota.

Linux tells the CPU set (`sched_getaffinity`: `docker run --cpuset-cpus`, a Kubernetes static CPU
policy). A quota (`docker run --cpus`, a Kubernetes CPU limit) is not a set: the process sees every
CPU of the host but may run only `quota / period` of them per period, and is throttled when its
threads take more. The engine's OpenMP threads meet at every product, so a pool sized to the host's
CPUs under a quota of a few spends its periods waiting for throttled threads. The quota is read
from the cgroup files, as the JVM and Go's automaxprocs read them: cgroup v2's `cpu.max` ("max
100000" or "200000 100000") and v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none), in this
process's cgroup and its ancestors (a limit anywhere above applies), and, where the container
mounts its own cgroup at the root, the root's. The CPUs a quota allows are rounded down (at least
one): 2.5 CPUs' worth of threads would be throttled in every period.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs of this process's CPU set, at most the whole CPUs its cgroup's quota allows."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (None: none, or
    no cgroup files to read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # not a cgroup line: nothing to read from it
            continue
        _, controllers, path = fields
        if controllers == "":  # v2, the unified hierarchy
            for folder in _up_from(cgroup_root, path):
                quotas.append(_v2_quota(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # v1, the cpu controller's own hierarchy
            for folder in _up_from(cgroup_root / controllers, path):
                quotas.append(_v1_quota(folder))
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _up_from(mount: Path, path: str) -> list[Path]:
    """The folders of cgroup `path` and of its ancestors under `mount`, the mount's root last."""
    parts = [p for p in path.split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()
        return None if quota == "max" else _cpus(int(quota), int(period))
    except (OSError, ValueError):  # unreadable or not the kernel's format: no limit we can tell
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _cpus(quota, period)  # a quota of -1: none


def _cpus(quota: int, period: int) -> float | None:
    """A quota in CPUs; None for what no kernel writes (a period or quota of 0 or less)."""
    return quota / period if quota > 0 and period > 0 else None
