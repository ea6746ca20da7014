"""Paths and names shared by the Dockerfile tests (a plain module: `conftest` is not importable by name
when several test folders have one)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ROOT / "dockerfiles"
# image name -> the `neo` subcommand its container runs
IMAGES = {"gateway": "gateway", "gpu-worker": "gpu-worker", "cpu-attention": "cpu-attention",
          "operator": "operator"}
CPU_IMAGES = ("gateway", "cpu-attention", "operator")


def dockerfile(name: str) -> Path:
    return DOCKERFILES / f"{name}.Dockerfile"
