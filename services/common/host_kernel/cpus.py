"""How many CPUs this process may really use: its affinity mask, capped by the cgroup CPU quota.

A container limited to 4 CPUs on a 64-core host still sees 64 CPUs in its affinity mask; the quota
(cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) is what the scheduler enforces,
so a thread pool sized from the host total would oversubscribe and stall.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_limit(rel: str, root: str) -> float | None:
    """Smallest quota/period along the cgroup v2 path (a parent's limit binds its children)."""
    best: float | None = None
    rel = rel.strip("/")
    parts = rel.split("/") if rel else []
    for depth in range(len(parts), -1, -1):
        text = _read(os.path.join(root, *parts[:depth], "cpu.max"))
        if not text:
            continue
        fields = text.split()
        if len(fields) == 2 and fields[0] != "max":
            limit = int(fields[0]) / int(fields[1])
            best = limit if best is None else min(best, limit)
    return best


def _v1_limit(rel: str, root: str) -> float | None:
    for base in (os.path.join(root, "cpu,cpuacct"), os.path.join(root, "cpu")):
        for path in (os.path.join(base, rel.strip("/")), base):
            quota = _read(os.path.join(path, "cpu.cfs_quota_us"))
            period = _read(os.path.join(path, "cpu.cfs_period_us"))
            if quota and period and int(quota) > 0 and int(period) > 0:
                return int(quota) / int(period)
    return None


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.5), or None when unlimited/unknown."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hier, controllers, rel = fields
        if hier == "0" and controllers == "":
            return _v2_limit(rel, root)
        if "cpu" in controllers.split(","):
            return _v1_limit(rel, root)
    return None


def available_cpus() -> int:
    """CPUs this process may use: affinity mask size, capped by the cgroup quota (rounded up)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def threads_per_rank(cpu_threads: int, world: int) -> int:
    """CPU attention threads of one tensor-parallel rank: ``--cpu-threads`` (0: every usable CPU)
    split evenly between the ranks' processes, which then share the host's memory bandwidth."""
    return max(1, (cpu_threads or available_cpus()) // world)


def rank_cpus(rank: int, world: int) -> set[int]:
    """The CPUs of this process's affinity mask that rank ``rank`` of ``world`` takes: a contiguous
    share each (ranks never compete for a core; their thread pools busy-wait)."""
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // world)
    mine = cpus[rank * per:(rank + 1) * per]
    return set(mine or cpus)
