"""The `neo` console script: one subcommand per process or tool, imported only when used.

Each entry point takes the remaining argv and returns an exit code, so processes start the same way
locally (`neo serve` launches the others) and in a pod (one container per subcommand).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("neo_gateway.launcher:main", "start gateway + gpu worker (+ cpu attention) on this machine"),
    "gateway": ("neo_gateway.server:main", "run the HTTP gateway and scheduler (control plane)"),
    "gpu-worker": ("neo_gpu_worker.main:main", "run the GPU worker (data plane)"),
    "cpu-attention": ("neo_cpu_attention.main:main", "run the CPU attention process (data plane)"),
    "probe-bandwidth": ("neo_cpu_attention.membw:main", "measure host memory read bandwidth"),
    "profile": ("neo_gpu_worker.profiler:main", "measure the cost tables of this machine"),
    "operator": ("neo_operator.main:main", "run the Kubernetes operator"),
    "fetch-model": ("neo_operator.model_fetch:main", "download an hf:// model (the operator's init container)"),
    "bench": ("neo_bench.serve:main", "online serving benchmark against an OpenAI-compatible server"),
}


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a bare tree."""
    try:
        return importlib.metadata.version("neo-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: neo COMMAND [ARGS...] | neo --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        sys.stdout.write(f"neo {version()}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"neo: unknown command {name!r}\n{_usage()}\n")
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
