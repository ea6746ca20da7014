"""`neo serve`: run one replica (gateway + gpu worker [+ cpu attention]) as processes on this machine.

Every child gets the same configuration flags, exactly as the containers of a pod get the same
ConfigMap. The launcher watches them: Ctrl-C or SIGTERM stops all of them. A crashed worker is
restarted (up to --max-worker-restarts times in ten minutes); if the gateway dies or workers keep
crashing, the others are stopped and the launcher exits non-zero, so a supervisor sees the failure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from neo_common.config import NeoConfig
from neo_common.link import LinkKeys, prepare_runtime_dir, remove_runtime_dir
from neo_common.procs import MULTICAST_OFF

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0
_RESTART_WINDOW_S = 600.0


class Replica:
    """The child processes of one replica, by role; ``procs`` holds each live Popen."""

    def __init__(self, config: NeoConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}

    def roles(self) -> list[str]:
        roles = ["gpu-worker", "gateway"]
        if self.config.scheduler.offload_mode != "off":
            roles.insert(0, "cpu-attention")
        return roles

    def start(self) -> None:
        for role in self.roles():
            self.start_role(role)

    def start_role(self, role: str) -> None:
        cmd = [sys.executable, "-m", "neo_common.cli", role, *self.config.to_args()]
        self.procs[role] = subprocess.Popen(cmd, env={**os.environ, **MULTICAST_OFF})
        log.info("started %s (pid %d)", role, self.procs[role].pid)

    def supervise(self) -> int:
        """Restart crashed workers (the gateway keeps queued requests meanwhile); give up, with the
        crashed child's exit code, when the gateway dies or workers crash too often."""
        limit = self.config.ipc.max_worker_restarts
        recent: list[float] = []
        while True:
            role, code = self.wait_any()
            now = time.monotonic()
            recent = [t for t in recent if now - t < _RESTART_WINDOW_S]
            if role == "gateway" or len(recent) >= limit:
                log.error("%s exited with code %d; stopping the replica", role, code)
                return code or 1
            recent.append(now)
            log.warning("%s exited with code %d; restarting it (%d of %d within %.0f s)", role, code,
                        len(recent), limit, _RESTART_WINDOW_S)
            self.start_role(role)

    def wait_any(self) -> tuple[str, int] | None:
        """Block until a child exits; returns its role and exit code."""
        while True:
            for role, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    return role, code
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for role, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", role, proc.pid)
                proc.kill()
                proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.for_process("neo serve", __doc__, argv, "launcher")
    replica = Replica(config)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    runtime_dir = prepare_runtime_dir(config.runtime_dir)   # private sockets and link keys: neo_common.link
    if config.uses_tcp:
        LinkKeys.load_or_create(runtime_dir)   # before any child starts, so all share one keypair
    try:
        replica.start()
        return replica.supervise()
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        replica.stop()
        remove_runtime_dir(runtime_dir)
