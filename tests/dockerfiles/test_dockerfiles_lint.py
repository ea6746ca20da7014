"""The Dockerfiles: hadolint-clean, and the conventions every image keeps (pinned base behind a
BASE_IMAGE build arg, multi-stage, non-root, health check, OCI labels, `neo` entry point)."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dockerfile_support import CPU_IMAGES, DOCKERFILES, IMAGES, ROOT, dockerfile

OCI_LABELS = ("title", "description", "version", "revision", "created", "licenses", "base.name")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_one_dockerfile_per_image() -> None:
    found = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES.glob("*.Dockerfile")}
    assert found == set(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_clean(name: str, hadolint: str) -> None:
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile(name))], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode != 0 and "DL3006" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_image_is_a_pinned_build_arg(name: str) -> None:
    ins = instructions(dockerfile(name))
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE_IMAGE="), "first instruction: ARG BASE_IMAGE=..."
    ref = ins[0][1].split("=", 1)[1]
    assert re.fullmatch(r"[a-z0-9./-]+/[a-z0-9._-]+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}", ref), ref
    froms = [args for word, args in ins if word == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE} AS "), "the first stage builds FROM ${BASE_IMAGE}"
    if name == "gpu-worker":
        assert "nvidia/cuda:" in ref
    else:
        assert "debian:bookworm-slim" in ref  # the release scripts/image-tools.sh debootstraps


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runtime_stage(name: str) -> None:
    all_stages = stages(dockerfile(name))
    assert len(all_stages) >= 3, "runtime-base, builder and runtime stages"
    final = all_stages[-1]
    words = [w for w, _ in final]
    text = "\n".join(f"{w} {a}" for w, a in final)
    assert "g++" not in text and "python3-dev" not in text, "no compilers in the runtime stage"
    assert "COPY --from=builder /opt/neo /opt/neo" in text
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] == "10001:10001", "runs as the non-root UID 10001 (shared by all images)"
    health = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "neo-healthcheck" in health[0]
    entry = [a for w, a in final if w == "ENTRYPOINT"]
    assert entry == [f'["neo", "{IMAGES[name]}"]'], entry
    labels = " ".join(a for w, a in final if w == "LABEL")
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.title="neo-{name}"' in labels
    assert words.index("LABEL") > words.index("COPY"), "labels (per-commit values) come after the layers"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_entry_points_exist(name: str) -> None:
    from neo_common.cli import COMMANDS

    assert IMAGES[name] in COMMANDS


@pytest.mark.parametrize("name", CPU_IMAGES)
def test_cpu_images_install_no_torch_by_default(name: str) -> None:
    text = dockerfile(name).read_text()
    assert "--exclude torch" in text
    assert 'ARG TORCH_VERSION=""' in text, "torch only on request (--build-arg TORCH_VERSION=...)"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text


def test_gpu_worker_installs_torch() -> None:
    text = dockerfile("gpu-worker").read_text()
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+", text)


def test_only_the_operator_gets_the_operator_extra() -> None:
    for name in IMAGES:
        assert ("--extra operator" in dockerfile(name).read_text()) == (name == "operator"), name


def test_dockerignore_admits_what_the_dockerfiles_copy() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore, ".dockerignore starts from nothing and admits paths"
    for name in IMAGES:
        for word, args in instructions(dockerfile(name)):
            if word != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                if src == ".":
                    continue
                top = src.split("/")[0]
                assert top in allowed, f"{name}: COPY {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"


def test_dockerignore_admits_every_package_folder() -> None:
    """`COPY . ./` takes what .dockerignore admits: every folder pyproject maps a package onto."""
    import tomllib

    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    missing = sorted(folders - allowed)
    assert not missing, f"add !{'/, !'.join(missing)}/ to .dockerignore: the images need those packages"
    for name in ("pyproject.toml", "setup.py", "README.md", "dockerfiles"):
        assert name in allowed, name


def test_pyproject_deps_lists_requirements() -> None:
    script = str(DOCKERFILES / "pyproject-deps.py")
    pyproject = str(ROOT / "pyproject.toml")

    def run(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, script, pyproject, *args], capture_output=True, text=True,
                             check=True).stdout
        return [re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0].lower() for line in out.splitlines()]

    everything = run("--extra", "worker")  # torch comes only with the GPU worker's extra
    no_torch = run("--extra", "worker", "--exclude", "torch")
    operator = run("--exclude", "torch", "--extra", "operator")
    assert "torch" in everything and "torch" not in no_torch and "torch" not in run()
    assert set(no_torch) == set(everything) - {"torch"} == set(run())
    assert {"kopf", "kubernetes", "pyyaml"} <= set(operator) and "kopf" not in no_torch
    bad = subprocess.run([sys.executable, script, pyproject, "--extra", "nope"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode != 0 and "nope" in bad.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_script() -> None:
    script = str(DOCKERFILES / "healthcheck.py")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])
    try:
        def check(*args: str, **env: str) -> int:
            return subprocess.run([sys.executable, script, *args], env={"PATH": "/usr/bin:/bin", **env},
                                  capture_output=True, timeout=30, check=False).returncode

        assert check("http", NEO_PORT=port) == 0
        _Health.status = 503
        assert check("http", NEO_PORT=port) == 1
        assert check("process", NEO_HEALTHCHECK_URL=f"http://127.0.0.1:{port}/health") == 1
        _Health.status = 200
        assert check("process", NEO_HEALTHCHECK_URL=f"http://127.0.0.1:{port}/health") == 0
        assert check("process") == 0  # PID 1 of this machine/container is alive
        assert check("bogus") == 2
    finally:
        server.shutdown()
        server.server_close()


def test_scripts_parse() -> None:
    for script in (ROOT / "scripts" / "image-tools.sh", DOCKERFILES / "build.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


OWNED = [ROOT / ".dockerignore", ROOT / "scripts" / "image-tools.sh", *sorted(DOCKERFILES.iterdir()),
         *sorted(Path(__file__).parent.glob("*.py"))]
PUBLIC_URLS = ("https://download.pytorch.org/", "http://127.0.0.1", "http://0.0.0.0")


@pytest.mark.parametrize("path", OWNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_specific_hosts_or_paths(path: Path) -> None:
    """Mirrors are read from the machine at run time; none is written into the repository."""
    if path.is_dir():
        return
    text = path.read_text()
    assert "/w" + "ork/" not in text
    for url in re.findall(r"https?://[A-Za-z0-9][^\s\"'`)]*", text):
        assert url.startswith(PUBLIC_URLS), f"{path.name}: {url}"
