"""Fixtures for the Dockerfile tests: the tools scripts/image-tools.sh prepares."""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest

from dockerfile_support import ROOT


@pytest.fixture(scope="session")
def image_tools() -> dict[str, str]:
    """Run scripts/image-tools.sh (seconds once cached; the first run debootstraps a base image)."""
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "image-tools.sh"), "--env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scripts/image-tools.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("NEO_"):
            env[key] = shlex.split(value)[0] if value else ""
    missing = {"NEO_HADOLINT", "NEO_PODMAN_ROOT", "NEO_PODMAN_RUNROOT", "NEO_PODMAN_STORAGE_DRIVER",
               "NEO_BASE_IMAGE"} - env.keys()
    assert not missing, f"image-tools.sh --env did not print {sorted(missing)}"
    env["elapsed_s"] = f"{time.monotonic() - start:.1f}"
    return env


@pytest.fixture(scope="session")
def hadolint(image_tools: dict[str, str]) -> str:
    path = image_tools["NEO_HADOLINT"]
    assert os.access(path, os.X_OK), f"no hadolint at {path}"
    return path
