"""Local process helpers shared by the data plane, the benchmarks and the tests (Linux /proc)."""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Sequence

# Environment every process of a replica starts with: NVLink multicast (NVLS) off in NCCL, NVSHMEM
# and PyTorch's symmetric memory. On shared multi-GPU hosts multicast objects can take the host down
# (or leak across tenants); NEO's collectives are small and do not need it. Set by `neo serve` for
# its children and by the operator for every container.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# After SIGTERM a gateway drains for --shutdown-grace-s, then ends its last streams, tells the workers
# to shut down and exits: every process of the replica (and the launcher) allows it this much more.
# terminationGracePeriodSeconds must exceed grace + margin.
STOP_MARGIN_S = 15.0

_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
_libc: ctypes.CDLL | None = None


def free_port(span: int = 1) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, with the ``span - 1`` ports above it
    (a tensor-parallel replica's CPU attention processes use consecutive ports)."""
    return free_ports(span)[0]


def free_ports(*spans: int) -> list[int]:
    """First ports of disjoint blocks of ``spans[i]`` consecutive free ports on 127.0.0.1. Every
    chosen port stays bound until all are chosen: separate ``free_port`` calls may hand out one port
    twice (the kernel reuses a port as soon as it is released)."""
    held: list[socket.socket] = []
    firsts = []
    try:
        for span in spans:
            while True:
                block = _bind_block(span)
                if block:
                    held += block
                    firsts.append(block[0].getsockname()[1])
                    break
    finally:
        for s in held:
            s.close()
    return firsts


def serve_port_flags(cpu_span: int = 1, given: Sequence[str] = ()) -> list[str]:
    """`neo serve` flags that put a replica on free ports: ``--port``, ``--worker-addr`` and
    ``--cpu-attention-addr`` (a block of ``cpu_span``: tensor-parallel rank r's CPU process uses the
    port + r), all chosen in one ``free_ports`` call; a flag already in ``given`` (as ``--flag V`` or
    ``--flag=V``) is left to it."""
    http, worker, cpu = free_ports(1, 1, cpu_span)
    out = []
    for flag, value in (("--port", str(http)), ("--worker-addr", f"tcp://127.0.0.1:{worker}"),
                        ("--cpu-attention-addr", f"tcp://127.0.0.1:{cpu}")):
        if not any(a == flag or a.startswith(flag + "=") for a in given):
            out += [flag, value]
    return out


def _bind_block(span: int) -> list[socket.socket]:
    """Sockets bound to an ephemeral port and the ``span - 1`` above it, or [] if one was taken."""
    first = socket.socket()
    first.bind(("127.0.0.1", 0))
    block = [first]
    port = first.getsockname()[1]
    for p in range(port + 1, port + span):
        s = socket.socket()
        block.append(s)
        try:
            if p >= 65536:
                raise OSError("past the last port")
            s.bind(("127.0.0.1", p))
        except OSError:
            for t in block:
                t.close()
            return []
    return block


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest last."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def load_libc() -> ctypes.CDLL:
    """The C library (for prctl); load it before forking, so a ``preexec_fn`` does not have to."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent(sig: int, parent: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits, even by SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``; the "parent" is the thread that forked it, so fork from a thread
    that lives as long as the process). Returns False when ``parent`` was gone already (this process
    was adopted before the call: no signal would ever come), for the caller to exit. Usable in a
    ``Popen`` ``preexec_fn`` (after ``load_libc()`` in the parent)."""
    if load_libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent
