"""Scheduler + IPC overhead per iteration, from a replica's ``/metrics`` scrape.

The gateway observes each iteration's wall time (scheduling, building the plan, IPC both ways,
the worker's execute, applying and detokenizing the outputs) in ``neo:iteration_duration_seconds``
and the worker's own time for it (receive to reply) in ``neo:worker_iteration_seconds``. What the
worker does not account for is the overhead the GPU waits through: ``1 - worker / wall``.

    python -m neo_bench.overhead metrics.txt
"""

from __future__ import annotations

import sys

from neo_bench.neo_vs_gpu_only import metric_value, parse_prometheus


def overhead(text: str) -> dict:
    s = parse_prometheus(text)
    wall = metric_value(s, "neo:iteration_duration_seconds_sum")
    work = metric_value(s, "neo:worker_iteration_seconds_sum")
    n = metric_value(s, "neo:iteration_duration_seconds_count")
    if not wall or not n or work is None:
        raise ValueError("the scrape has no iteration histograms (no iteration ran?)")
    return {"iterations": int(n), "wall_ms": wall / n * 1e3, "worker_ms": work / n * 1e3,
            "overhead_fraction": 1 - work / wall}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        o = overhead(f.read())
    print(f"iterations {o['iterations']}: gateway wall {o['wall_ms']:.2f} ms/iter, worker {o['worker_ms']:.2f} "
          f"ms/iter, scheduler+IPC overhead {o['overhead_fraction'] * 100:.1f}% of iteration time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
