"""Host memory read bandwidth (``neo probe-bandwidth``), measured the way the kernel reads memory.

A STREAM-style read of a buffer far larger than the caches, by the kernel's own thread pool and
native SIMD code, best of a few passes. The Kubernetes operator's probe Job runs
``neo probe-bandwidth --json`` and parses the one JSON line it prints:
``{"read_gbps": float, "threads": int, "cpu_model": str}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Sequence

from neo_common.host_kernel import _native, kernel

log = logging.getLogger(__name__)

DEFAULT_SIZE_MB = 1024


def cpu_model() -> str:
    """Model name of the host CPU (/proc/cpuinfo), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_read_bandwidth(threads: int, size_bytes: int, reps: int = 5) -> float:
    """Best read bandwidth in GB/s (1e9 B/s) of ``threads`` threads over ``size_bytes`` (0: all CPUs).

    Resizes the process-wide kernel pool to ``threads``.
    """
    kernel.set_num_threads(threads)
    gbps = _native.measure_read_gbps(int(size_bytes), int(reps))
    if gbps <= 0:
        raise MemoryError(f"could not allocate {size_bytes} bytes for the bandwidth probe")
    log.info("read bandwidth %.1f GB/s (%d threads, %d MiB)", gbps, kernel.get_num_threads(), size_bytes >> 20)
    return gbps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neo probe-bandwidth", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--threads", type=int, default=0, help="threads (0: the CPUs this process may use)")
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="buffer size in MiB")
    parser.add_argument("--reps", type=int, default=5, help="passes (best is reported)")
    args = parser.parse_args(argv)
    gbps = measure_read_bandwidth(args.threads, args.size_mb << 20, args.reps)
    result = {"read_gbps": round(gbps, 2), "threads": kernel.get_num_threads(), "cpu_model": cpu_model()}
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(f"read bandwidth {result['read_gbps']} GB/s with {result['threads']} threads "
                         f"on {result['cpu_model']} (ISA {kernel.isa()})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
