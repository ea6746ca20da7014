"""Tensor parallelism in the GPU worker: the process group, the collectives, the follower ranks.

One process per GPU. Rank 0 is the worker the gateway talks to; it starts ranks 1..N-1 as child
processes (:func:`start_followers`) and forwards every plan frame to them over one ZeroMQ PUSH
socket each, before it runs the plan itself. Every rank then runs the same forward on its shard
(``neo_common.tensor_parallel``): the layers all-reduce their row-parallel outputs over the default
process group (NCCL on CUDA, gloo on the CPU device), rank 0 samples and broadcasts the tokens, so
every rank holds them for the next plan's placeholder tokens. Followers answer nothing: a plan a
rank rejects is rejected by every rank alike (the checks depend on the plan only).

The plan travels over ZeroMQ, not a collective, because a follower waits for it without a time
limit while the service idles (collectives time out), and PUSH queues frames until the follower
connects, so nothing is lost at start. A follower exits when its parent goes; rank 0 exits when a
follower dies (its next collective would hang), and the launcher restarts the worker.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import threading
import time

import torch
import torch.distributed as dist
import zmq

from neo_common.tensor_parallel import Shard

log = logging.getLogger(__name__)

_WATCH_S = 0.5


class TensorParallel:
    """This process's place in the group.

    - ``shard``: the slice of the model this rank holds (``world == 1``: all of it; every
      collective is then a no-op and nothing is initialised).
    - ``device``: the rank's device; collectives on its tensors use the default group.
    """

    def __init__(self, shard: Shard, device: torch.device) -> None:
        self.shard, self.device = shard, device

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world(self) -> int:
        return self.shard.world

    def init_group(self, init_method: str, timeout_s: float) -> None:
        """Join the process group (every rank calls it; it returns once all have)."""
        if self.world == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": self.device} if backend == "nccl" else {}))
        log.info("tensor-parallel rank %d of %d joined (%s)", self.rank, self.world, backend)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``x`` (in place)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (in place; the other ranks pass a buffer of the same shape)."""
        if self.world > 1:
            dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. the KV blocks every rank can hold)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


class FollowerLinks:
    """Rank 0's PUSH sockets to the followers and their processes.

    - ``addrs``: the address follower r connects to is ``addrs[r - 1]``.
    - ``procs``: the followers' processes, started by :func:`start_followers`.
    - ``stopping``: set once rank 0 passes on a Shutdown: followers exiting is then expected.
    """

    def __init__(self, ctx: zmq.Context, world: int, runtime_dir: str) -> None:
        self.socks = []
        self.addrs = []
        self.runtime_dir = runtime_dir
        for rank in range(1, world):
            # in the replica's private runtime directory: a local peer that could connect to a
            # PUSH socket would be dealt every other plan (docs/design.md, "The process link")
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            addr = "ipc://" + os.path.join(runtime_dir, f"gpu-worker-{os.getpid()}-tp{rank}.sock")
            sock.bind(addr)
            self.socks.append(sock)
            self.addrs.append(addr)
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.stopping = False

    def forward(self, frame: bytes, wait: bool = True) -> None:
        """Queue ``frame`` for every follower; ``wait=False`` skips a follower that is gone (a PUSH
        socket without its peer would block forever)."""
        for sock in self.socks:
            try:
                sock.send(frame, 0 if wait else zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)


def start_followers(config, links: FollowerLinks, target) -> str:
    """Start ranks 1..N-1 running ``target(config, rank, init_method, frames_addr)``; returns the
    process group's init method. A thread exits this process when a follower dies."""
    # a file store in the private runtime directory: a TCP store on a free port would let any local
    # process join the rendezvous
    store = os.path.join(links.runtime_dir, f"gpu-worker-{os.getpid()}-rendezvous")
    if os.path.exists(store):
        os.unlink(store)   # a crashed predecessor's (pids are reused): a stale store would misjoin
    init_method = "file://" + store
    ctx = multiprocessing.get_context("spawn")   # never fork a process that may hold CUDA state
    for rank, addr in enumerate(links.addrs, start=1):
        proc = ctx.Process(target=target, args=(config, rank, init_method, addr), daemon=True,
                           name=f"gpu-worker-tp{rank}")
        proc.start()
        log.info("started tensor-parallel rank %d (pid %d)", rank, proc.pid)
        links.procs.append(proc)
    threading.Thread(target=_exit_when_a_follower_dies, args=(links,), daemon=True).start()
    return init_method


def _exit_when_a_follower_dies(links: FollowerLinks) -> None:
    while not links.stopping:
        for proc in links.procs:
            if not proc.is_alive() and not links.stopping:
                log.error("tensor-parallel rank %s (pid %d) exited with code %s; the worker exits too",
                          proc.name, proc.pid, proc.exitcode)
                os._exit(1)
        time.sleep(_WATCH_S)
