#!/usr/bin/env python3
"""Print the requirements of pyproject.toml, one a line, for `pip install -r`.

The images install the package with `pip install --no-deps` after installing its requirements from
this list, so each image can leave out what its processes never import (torch, for the CPU-only
images) while pyproject.toml stays the single list of dependencies.

usage: pyproject-deps.py PYPROJECT [--extra NAME]... [--exclude NAME]...
       pyproject-deps.py PYPROJECT --build-system     (the [build-system] requirements)
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def requirement_name(req: str) -> str:
    """The normalized project name a PEP 508 requirement starts with."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise ValueError(f"not a requirement: {req!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, extras: list[str], exclude: list[str]) -> list[str]:
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"no extra {extra!r} in pyproject.toml (have: {', '.join(sorted(optional))})")
        reqs += optional[extra]
    dropped = {requirement_name(name) for name in exclude}
    return [req for req in reqs if requirement_name(req) not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="also list this extra's requirements")
    parser.add_argument("--exclude", action="append", default=[], help="leave out this project")
    parser.add_argument("--build-system", action="store_true", help="list [build-system] requires")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    if args.build_system:
        sys.stdout.write("".join(req + "\n" for req in data.get("build-system", {}).get("requires", [])))
        return 0
    sys.stdout.write("".join(req + "\n" for req in requirements(data, args.extra, args.exclude)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
