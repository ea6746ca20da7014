"""Scheduler + IPC overhead per iteration, from a replica's ``/metrics`` scrape.

The gateway observes each iteration's wall time (scheduling, building the plan, IPC both ways,
the worker's execute, applying and detokenizing the outputs) in ``neo:iteration_duration_seconds``
and the worker's own time for it in ``neo:worker_iteration_seconds`` (on a GPU, the device's: CUDA
events from where the device reached the iteration to its tokens on the host). What the worker does
not account for is the overhead the GPU waits through: ``1 - worker / wall``. Also counted: the
iterations the worker launched while the previous one still ran (``neo:worker_launched_ahead``).

With ``--since EARLIER`` (a scrape taken before), only the iterations between the two scrapes
count: taken once every request of a fixed-length batch is decoding, that isolates the iterations
at full batch from the prefill phase.

    python -m neo_bench.overhead metrics.txt [--since metrics_at_full_batch.txt]
"""

from __future__ import annotations

import argparse
import sys

from neo_bench.neo_vs_gpu_only import metric_value, parse_prometheus


_NAMES = ("neo:iteration_duration_seconds_sum", "neo:worker_iteration_seconds_sum",
          "neo:iteration_duration_seconds_count", "neo:worker_launched_ahead_total")


def overhead(text: str, since: str | None = None) -> dict:
    s = parse_prometheus(text)
    wall, work, n, ahead = (metric_value(s, name) or 0.0 for name in _NAMES)
    if since is not None:
        before = parse_prometheus(since)
        wall, work, n, ahead = (now - (metric_value(before, name) or 0.0)
                                for now, name in zip((wall, work, n, ahead), _NAMES))
    if not wall or not n:
        raise ValueError("the scrape has no iteration histograms (no iteration ran?)")
    return {"iterations": int(n), "wall_ms": wall / n * 1e3, "worker_ms": work / n * 1e3,
            "overhead_fraction": 1 - work / wall, "launched_ahead": int(ahead)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="a /metrics scrape")
    ap.add_argument("--since", help="an earlier scrape of the same server: count only the iterations after it")
    args = ap.parse_args(argv)
    with open(args.metrics) as f:
        text = f.read()
    since = None
    if args.since:
        with open(args.since) as f:
            since = f.read()
    o = overhead(text, since)
    print(f"iterations {o['iterations']}: gateway wall {o['wall_ms']:.2f} ms/iter, worker {o['worker_ms']:.2f} "
          f"ms/iter, scheduler+IPC overhead {o['overhead_fraction'] * 100:.1f}% of iteration time, "
          f"{o['launched_ahead']} launched ahead of the previous one's end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
