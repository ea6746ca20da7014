"""Tensor-parallel tests: run a function on real gloo ranks, one spawned process each."""

from __future__ import annotations

import multiprocessing

from neo_common.procs import free_port


def run_gloo_ranks(target, *args, world: int = 2, timeout_s: float = 150.0) -> tuple[list, list[int | None]]:
    """Start ``target(*args, rank, world, init_method, queue)`` on ``world`` spawned processes; each
    puts one result on the queue. Returns the results, sorted, and the processes' exit codes (a
    process still alive after its result is killed, and reported as such)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=target, args=(*args, rank, world, init, out)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    return results, [p.exitcode for p in procs]
