"""scripts/k8s-tools.sh is idempotent: with the cache filled it only checks, quickly, and prints to stderr."""

from __future__ import annotations

import subprocess
import time

import pytest

from kube_cluster import CACHE, REPO, tool

pytestmark = pytest.mark.k8s


def test_second_run_is_a_cache_hit() -> None:
    t0 = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts" / "k8s-tools.sh")], capture_output=True, text=True,
                            timeout=300)
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", "progress belongs on stderr"
    assert "kube-apiserver, kube-controller-manager: cached" in result.stderr
    assert elapsed < 60


def test_cached_binaries_are_the_expected_versions() -> None:
    for name in ("kube-apiserver", "kube-controller-manager"):
        out = subprocess.run([str(tool(name)), "--version"], capture_output=True, text=True, check=True).stdout
        assert "v1.20.2" in out, out
    assert "v4." in subprocess.run([str(tool("helm")), "version", "--short"], capture_output=True, text=True,
                                   check=True).stdout
    assert CACHE.name == "1.20.2"
