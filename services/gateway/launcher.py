"""`neo serve`: run one replica (gateway + gpu worker [+ cpu attention]) as processes on this machine.

Every child gets the same configuration flags, exactly as the containers of a pod get the same
ConfigMap. The launcher watches them. Ctrl-C or SIGTERM (handled whatever the launcher inherited:
a shell's background job starts with SIGINT ignored) drains the replica: the gateway gets SIGTERM,
finishes its in-flight requests within --shutdown-grace-s and tells the workers to shut down; the
workers still running then get SIGTERM; a second Ctrl-C ends the drain at once. A crashed worker is
restarted (up to --max-worker-restarts times in ten minutes); if the gateway dies or workers keep
crashing, the others are stopped and the launcher exits non-zero, so a supervisor sees the failure.

The children die with the launcher, even when it is killed with SIGKILL (the kernel's parent-death
signal: SIGKILL for the gateway, which frees the HTTP port at once; SIGTERM for the workers, which
then remove their shared-memory segment). Each runs in its own process group, so a terminal's Ctrl-C
reaches the launcher alone, which stops them in order.
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
from neo_common.procs import MULTICAST_OFF, STOP_MARGIN_S, die_with_parent, load_libc

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0      # a worker still running after the gateway left gets this long after SIGTERM
_RESTART_WINDOW_S = 600.0
_POLL_S = 0.1


def _death_signal(role: str) -> signal.Signals:
    return signal.SIGKILL if role == "gateway" else signal.SIGTERM


class Replica:
    """The child processes of one replica, by role.

    - ``procs``: each role's live Popen (replaced when a crashed worker is restarted).
    - ``signals``: the stop signals received (the handler only records them: the supervising loop
      and ``stop`` act on them, never half-way through starting a child).
    """

    def __init__(self, config: NeoConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.signals: list[int] = []

    def on_signal(self, signum: int, _frame) -> None:
        self.signals.append(signum)

    def roles(self) -> list[str]:
        roles = ["gpu-worker", "gateway"]
        if self.config.offload_enabled:
            roles.insert(0, "cpu-attention")
        return roles

    def start(self) -> None:
        for role in self.roles():
            self.start_role(role)

    def start_role(self, role: str) -> None:
        cmd = [sys.executable, "-m", "neo_common.cli", role, *self.config.to_args()]
        secrets = self.config.secret_env() if role == "gateway" else {}  # never flags: argv is public
        self.procs[role] = subprocess.Popen(cmd, env={**os.environ, **MULTICAST_OFF, **secrets},
                                            process_group=0, preexec_fn=self._child_setup(role))
        log.info("started %s (pid %d)", role, self.procs[role].pid)

    @staticmethod
    def _child_setup(role: str):
        """Runs in the child between fork and exec: tie its life to the launcher's."""
        parent, sig = os.getpid(), _death_signal(role)
        load_libc()   # now, in the parent: the child only calls into it

        def setup() -> None:
            if not die_with_parent(sig, parent):
                os._exit(1)   # the launcher died while this child was being started
        return setup

    def supervise(self) -> int:
        """Restart crashed workers (the gateway keeps queued requests meanwhile); give up, with the
        crashed child's exit code, when the gateway dies or workers crash too often. Returns 0 when
        the replica was asked to stop: a signal, or a child that stopped cleanly (the gateway
        drained and exited, or a worker left on the gateway's Shutdown)."""
        limit = self.config.ipc.max_worker_restarts
        recent: list[float] = []
        while True:
            event = self.wait_any()
            if event is None:
                log.info("%s: stopping the replica (the gateway drains for up to %.0f s)",
                         signal.Signals(self.signals[0]).name, self.config.http.shutdown_grace_s)
                return 0
            role, code = event
            if code == 0:
                log.info("%s stopped cleanly; stopping the replica", role)
                return 0
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
        """Block until a child exits (its role and exit code) or a stop signal arrives (None)."""
        while not self.signals:
            for role, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    return role, code
            time.sleep(_POLL_S)
        return None

    def stop(self) -> None:
        """Drain the gateway first (it finishes its requests, then tells the workers to shut down);
        then SIGTERM the workers still running (with the gateway gone they stop at once), SIGKILL
        those that do not within ``_STOP_GRACE_S``."""
        gateway = self.procs.get("gateway")
        if gateway is not None and gateway.poll() is None:
            self._drain(gateway)
        workers = [(role, proc) for role, proc in self.procs.items() if role != "gateway"]
        for _, proc in workers:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for role, proc in workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", role, proc.pid)
                proc.kill()
                proc.wait()

    def _drain(self, gateway: subprocess.Popen) -> None:
        """SIGTERM the gateway and wait for its drain (grace + margin); a further Ctrl-C or SIGTERM
        to the launcher is passed on as SIGINT, which ends the drain at once."""
        seen = len(self.signals)
        gateway.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.http.shutdown_grace_s + STOP_MARGIN_S
        while gateway.poll() is None and time.monotonic() < deadline:
            if len(self.signals) > seen:
                seen = len(self.signals)
                gateway.send_signal(signal.SIGINT)
            time.sleep(_POLL_S)
        if gateway.poll() is None:
            log.warning("the gateway (pid %d) did not finish draining in time; killing it", gateway.pid)
            gateway.kill()
            gateway.wait()


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.for_process("neo serve", __doc__, argv, "launcher")
    replica = Replica(config)
    for sig in (signal.SIGTERM, signal.SIGINT):   # SIGINT too: it may have come ignored
        signal.signal(sig, replica.on_signal)
    runtime_dir = prepare_runtime_dir(config.runtime_dir)   # private sockets and link keys: neo_common.link
    if config.uses_tcp:
        LinkKeys.load_or_create(runtime_dir)   # before any child starts, so all share one keypair
    try:
        replica.start()
        return replica.supervise()
    finally:
        replica.stop()
        remove_runtime_dir(runtime_dir)
