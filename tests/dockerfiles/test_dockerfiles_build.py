"""Build the CPU-only images (gateway, cpu-attention, operator) with podman against the locally
debootstrapped base (no registry is reachable) and check what they hold and that they run.

`podman run` needs an OCI runtime that may not work where the tests run (in a container that may not
set rlimits, for one); then the checks run the image with `buildah run --isolation=chroot` on a
working container made from it: the image's own root file system, user, environment and working
directory, without an OCI runtime. The test output says which one ran.

The three images are built from one snapshot of the build context taken at the start, so they see one
state of a checkout that others may be editing and share their builder layers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dockerfile_support import CPU_IMAGES, IMAGES, ROOT

pytestmark = pytest.mark.slow
BUILD_TIMEOUT_S = 1500


class Images:
    """Builds each image once per session and runs commands in them."""

    def __init__(self, tools: dict[str, str], context: Path) -> None:
        self.tools = tools
        self.context = context
        self.storage = ["--root", tools["NEO_PODMAN_ROOT"], "--runroot", tools["NEO_PODMAN_RUNROOT"],
                        "--storage-driver", tools["NEO_PODMAN_STORAGE_DRIVER"]]
        self.built: dict[str, str] = {}
        self.build_seconds: dict[str, float] = {}
        self._runner: str | None = None

    def podman(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *self.storage, *args], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def buildah(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["buildah", *self.storage, *args], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def build(self, name: str) -> str:
        if name not in self.built:
            tag = f"localhost/neo-{name}:test-{os.getpid()}"
            env = {**os.environ, **{k: v for k, v in self.tools.items() if k.startswith("NEO_")},
                   "NEO_IMAGE_TAG": tag, "NEO_BUILD_CONTEXT": str(self.context)}
            start = time.monotonic()
            proc = subprocess.run(["bash", str(ROOT / "dockerfiles" / "build.sh"), name], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
            self.build_seconds[name] = time.monotonic() - start
            if proc.returncode != 0:
                pytest.fail(f"building {name} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                            f"{proc.stderr[-3000:]}")
            self.built[name] = tag
        return self.built[name]

    def inspect(self, name: str) -> dict:
        return json.loads(self.podman("image", "inspect", self.build(name)).stdout)[0]

    @property
    def runner(self) -> str:
        """'podman' where `podman run` works here, else 'buildah' (chroot isolation)."""
        if self._runner is None:
            probe = self.podman("run", "--rm", "--network", "host", self.tools["NEO_BASE_IMAGE"], "true",
                                timeout=120, check=False)
            self._runner = "podman" if probe.returncode == 0 else "buildah"
            if self._runner == "buildah":
                print(f"podman run does not work here ({probe.stderr.strip()[-200:]}); "
                      "running the images with buildah run --isolation=chroot")
        return self._runner

    def run(self, name: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run argv in the image (as its user, with its environment), entry point overridden."""
        image = self.build(name)
        if self.runner == "podman":
            return self.podman("run", "--rm", "--network", "host", "--entrypoint", argv[0], image, *argv[1:],
                               timeout=timeout, check=False)
        ctr = self.buildah("from", "--pull=never", image).stdout.strip().splitlines()[-1]
        try:
            return self.buildah("run", "--isolation=chroot", "--network=host", ctr, "--", *argv,
                                timeout=timeout, check=False)
        finally:
            self.buildah("rm", ctr, check=False)

    def untag_all(self) -> None:
        for tag in self.built.values():  # the layers stay in the build cache
            self.podman("untag", tag, check=False)


def snapshot_context(dest: Path) -> Path:
    """Copy what the images are built from, once: the three builds see one state of a checkout that
    others may be editing, and share their builder layers."""
    admitted = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")]
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", ".pytest_cache")
    for name in [".dockerignore", *admitted]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=junk)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def images(image_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    imgs = Images(image_tools, snapshot_context(tmp_path_factory.mktemp("context")))
    yield imgs
    imgs.untag_all()
    print(f"image-tools.sh: {image_tools['elapsed_s']} s; builds: "
          + ", ".join(f"{n} {s:.0f} s" for n, s in imgs.build_seconds.items()))


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
@pytest.mark.parametrize("name", CPU_IMAGES)
def test_image_builds_with_expected_metadata(images: Images, name: str) -> None:
    info = images.inspect(name)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["neo", IMAGES[name]]
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    assert health.get("Test", [None])[0] == "CMD" and "neo-healthcheck" in health["Test"], health
    labels = config.get("Labels") or info.get("Labels") or {}
    assert labels["org.opencontainers.image.title"] == f"neo-{name}"
    assert labels["org.opencontainers.image.base.name"] == images.tools["NEO_BASE_IMAGE"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    for key in ("version", "revision", "created"):
        assert labels[f"org.opencontainers.image.{key}"] not in ("", "unknown"), key
    print(f"{name}: {info['Size'] / 2**20:.0f} MiB")


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
@pytest.mark.parametrize("name", CPU_IMAGES)
def test_image_runs_neo(images: Images, name: str) -> None:
    top = images.run(name, "neo", "--help")
    assert top.returncode == 0 and "usage: neo COMMAND" in top.stdout, top.stdout + top.stderr
    own = images.run(name, "neo", IMAGES[name], "--help")
    assert own.returncode == 0 and "usage:" in own.stdout, own.stdout + own.stderr
    if name == "cpu-attention":  # the operator's per-node bandwidth probe Job runs this image
        probe = images.run(name, "neo", "probe-bandwidth", "--help")
        assert probe.returncode == 0 and "usage:" in probe.stdout, probe.stdout + probe.stderr
    who = images.run(name, "id", "-u")
    assert who.stdout.strip() == "10001", who.stdout + who.stderr


CHECK_IMPORTS = """
import importlib, importlib.util, json, sys
from neo_common.cli import COMMANDS
mod = COMMANDS[sys.argv[1]][0].split(":")[0]
importlib.import_module(mod)
extra = sys.argv[2:]
for name in extra:
    importlib.import_module(name)
print(json.dumps({"entry": mod, "torch": importlib.util.find_spec("torch") is not None,
                  "torch_loaded": "torch" in sys.modules}))
"""


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
@pytest.mark.parametrize("name", CPU_IMAGES)
def test_image_is_torch_free_and_imports_its_entry_point(images: Images, name: str) -> None:
    """The CPU images carry no torch: their processes' code must not import it (see README)."""
    extra = ["neo_common.host_kernel._native"] if name == "cpu-attention" else []
    proc = images.run(name, "python3", "-c", CHECK_IMPORTS, IMAGES[name], *extra)
    assert proc.returncode == 0, (
        f"{name}: importing its entry point in the image failed. If the code now imports torch, the image "
        f"needs it (--build-arg TORCH_VERSION=...):\n{proc.stdout}{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and result["torch_loaded"] is False


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_healthcheck_command_in_image(images: Images) -> None:
    """The process check passes in a live container; the gateway's HTTP check fails while nothing listens."""
    assert images.run("cpu-attention", "neo-healthcheck", "process").returncode == 0
    with socket.socket() as s:  # a port nothing listens on (the runs share the host's network)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = images.run("gateway", "env", f"NEO_PORT={port}", "neo-healthcheck", "http")
    assert down.returncode == 1 and f"127.0.0.1:{port}/health" in down.stderr, down.stderr
