"""Thread count from affinity and the cgroup CPU quota (v2 and v1 layouts, faked on disk)."""

from __future__ import annotations

import os

from neo_common.host_kernel import cpus


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_cgroup_v2_quota_takes_tightest_ancestor(tmp_path):
    root = tmp_path / "cg"
    write(str(tmp_path / "self"), "0::/kubepods/pod1/ctr\n")
    write(str(root / "cpu.max"), "max 100000\n")
    write(str(root / "kubepods" / "cpu.max"), "800000 100000\n")
    write(str(root / "kubepods" / "pod1" / "ctr" / "cpu.max"), "250000 100000\n")
    assert cpus.cgroup_cpu_limit(str(tmp_path / "self"), str(root)) == 2.5


def test_cgroup_v2_unlimited(tmp_path):
    write(str(tmp_path / "self"), "0::/\n")
    write(str(tmp_path / "cg" / "cpu.max"), "max 100000\n")
    assert cpus.cgroup_cpu_limit(str(tmp_path / "self"), str(tmp_path / "cg")) is None


def test_cgroup_v1_quota(tmp_path):
    write(str(tmp_path / "self"), "12:memory:/x\n4:cpu,cpuacct:/docker/abc\n")
    base = tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc"
    write(str(base / "cpu.cfs_quota_us"), "300000\n")
    write(str(base / "cpu.cfs_period_us"), "100000\n")
    assert cpus.cgroup_cpu_limit(str(tmp_path / "self"), str(tmp_path / "cg")) == 3.0


def test_available_cpus_is_capped_by_quota(monkeypatch):
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpus.available_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert cpus.available_cpus() == 64
