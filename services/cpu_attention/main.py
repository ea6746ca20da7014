"""``neo cpu-attention``: the CPU decode-attention process of one replica (no torch).

With ``--tensor-parallel-size N`` this process serves rank 0 and starts ranks 1..N-1 as children:
one process per GPU worker rank, each attached to that rank's host KV segment (its KV heads only),
talking to the gateway on its own address (``--cpu-attention-addr`` port plus the rank), with its
share of ``--cpu-threads`` pinned to its own share of the CPUs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from typing import Sequence

from neo_common.config import NeoConfig
from neo_common.logs import setup_logging

log = logging.getLogger(__name__)

RANK_STOP_WAIT_S = 10.0   # a rank that outlives rank 0 by this long after its SIGTERM is killed


def _setup_logging(config: NeoConfig, rank: int) -> None:
    setup_logging(config.http.log_level, "cpu_attention" if rank == 0 else f"cpu_attention.tp{rank}")


def serve_rank(config: NeoConfig, rank: int) -> int:
    """Serve rank ``rank``'s segment until shutdown (in this process)."""
    from neo_common.host_kernel.cpus import rank_cpus, threads_per_rank
    from neo_cpu_attention.server import CpuAttentionServer, install_signal_handlers

    world = config.device.tensor_parallel_size
    if world > 1:
        os.sched_setaffinity(0, rank_cpus(rank, world))   # before the kernel's pool starts its threads
    server = CpuAttentionServer(config.for_rank(rank), threads=threads_per_rank(config.device.cpu_threads, world))
    install_signal_handlers(server)
    return server.run()


def _child(config: NeoConfig, rank: int) -> None:
    from neo_common import tracing
    from neo_common.procs import die_with_parent

    _setup_logging(config, rank)
    # rank 0's death (even by SIGKILL) sends SIGTERM: the rank stops and removes a segment whose
    # GPU worker is gone too
    if not die_with_parent(signal.SIGTERM, multiprocessing.parent_process().pid):
        raise SystemExit(1)
    tracing.setup_tracing("neo-cpu-attention")
    try:
        code = serve_rank(config, rank)
    finally:
        tracing.shutdown_tracing()
    raise SystemExit(code)


def _exit_at_once(_signum, _frame) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):   # until the server's own handlers (whatever was inherited)
        signal.signal(sig, _exit_at_once)
    config = NeoConfig.from_args(argv)
    _setup_logging(config, 0)
    from neo_common import tracing

    tracing.setup_tracing("neo-cpu-attention")
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=_child, args=(config, rank), name=f"cpu-attention-tp{rank}")
                for rank in range(1, config.device.tensor_parallel_size)]
    for child in children:
        child.start()
        log.info("started rank %s (pid %d)", child.name, child.pid)
    try:
        return serve_rank(config, 0)
    finally:
        # The ranks stop by themselves on what stopped this one (the gateway's Shutdown or
        # departure, the launcher's death, the deadline); a signal, then SIGKILL, if one did not.
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(RANK_STOP_WAIT_S)
            if child.is_alive():
                child.kill()
                child.join()
        tracing.shutdown_tracing()


if __name__ == "__main__":
    raise SystemExit(main())
