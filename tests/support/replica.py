"""Real `neo serve` replicas for tests: free ports, readiness, metrics, stop and reap by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterable

import httpx

from neo_common.procs import descendants, free_port, free_ports, pid_alive, serve_port_flags  # noqa: F401 (the tests import them from here)


def wait_until(cond, timeout: float, step: float = 0.1) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def reap(proc: subprocess.Popen | None, pids: Iterable[int]) -> None:
    """What a test leaves behind: ``proc`` killed (and waited for) if it still runs, then each of
    ``pids`` (its process tree, taken while it ran) that outlived it, by SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def http_status(url: str) -> int:
    """Status code of a GET, -1 when nothing answers."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return -1


# The session-wide replica of tests/conftest.py: a small GPU pool so concurrency forces preemption.
SMALL_POOL_BLOCKS = 48
SMALL_POOL_MAX_LEN = 512


class Replica:
    """A `neo serve` process tree started by a test; stopped and reaped by PID."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        # the HTTP port alone: the links are then the default, sockets in the replica's own runtime
        # directory (derived from the port); a test that wants tcp links passes their addresses
        self.args = [*serve_port_flags(4, args)[:2], *args] if "--port" not in args else list(args)
        self.port = int(self.args[self.args.index("--port") + 1])
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "serve", *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"neo serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"neo serve not ready after {timeout}s:\n{self.tail()}")

    @property
    def config(self):
        """The NeoConfig every process of this replica runs with (addresses, segment names)."""
        from neo_common.config import NeoConfig

        return NeoConfig.from_args(self.args, env={})

    def tail(self, n: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The first sample of ``name`` on /metrics that carries ``labels`` (any, when none are given)."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") and all(w in line for w in want) or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass   # reap kills it
        reap(self.proc, tree)
        self.log.close()
