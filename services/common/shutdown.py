"""When a process the API server needs (GPU worker, CPU attention, engine core) stops after a signal.

In Kubernetes every container of a pod gets SIGTERM at the same moment, while the gateway drains
for up to ``--shutdown-grace-s`` and needs its workers all that time. So a worker does not stop at
the first signal: it serves on until the gateway says Shutdown (its own message path), or leaves,
or its parent is gone, or a second signal comes, or the grace plus ``STOP_MARGIN_S`` has passed.
Whatever a process inherited (a shell's background job ignores SIGINT), both signals are handled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from neo_common.procs import STOP_MARGIN_S

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WATCH_S = 0.1


class SignalStop:
    """The signal policy of one worker process.

    - ``connected()``: whether the gateway is connected now (False: it left, or never came).
    - ``stop(reason)``: makes the process stop; called in the signal handler (main thread) or in
      the watch thread, and again by every later signal (it must be idempotent).
    - ``parent``: pid of the process that started this one (its death stops this one at once;
      ``neo serve``'s death signal arrives as SIGTERM for that).
    - ``limit_s``: the longest a signalled process waits for the gateway (grace + margin).
    - ``signals``: how many arrived; ``stopped``: the reason once ``stop`` was called.
    """

    def __init__(self, name: str, grace_s: float, connected: Callable[[], bool],
                 stop: Callable[[str], None], parent: int | None = None) -> None:
        self.name, self.connected, self._stop = name, connected, stop
        self.parent = os.getppid() if parent is None else parent
        self.limit_s = grace_s + STOP_MARGIN_S
        self.signals = 0
        self.deadline: float | None = None
        self.stopped: str | None = None
        self._lock = threading.Lock()

    def install(self) -> "SignalStop":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        return self

    def on_signal(self, signum: int, _frame) -> None:
        self.signals += 1
        if self.stopped is not None:   # decided already (the watch thread may wake us to act on it)
            self._stop(self.stopped)
            return
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.deadline = time.monotonic() + self.limit_s
        reason = self.reason() or (f"{name} again" if self.signals > 1 else None)
        if reason is not None:
            self.stop(f"{name}: {reason}")
            return
        log.info("%s: %s: serving until the gateway says Shutdown or leaves (at most %.0f s)",
                 self.name, name, self.limit_s)
        threading.Thread(target=self._watch, name="signal-stop", daemon=True).start()

    def reason(self) -> str | None:
        """Why a signalled process should stop now (None: serve on)."""
        if os.getppid() != self.parent:
            return "the parent process is gone"
        if not self.connected():
            return "the gateway is not connected"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"the gateway did not say Shutdown within {self.limit_s:.0f} s"
        return None

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.stopped is not None:
                return
            self.stopped = reason
        log.info("%s stops (%s)", self.name, reason)
        self._stop(reason)

    def _watch(self) -> None:
        while self.stopped is None:
            reason = self.reason()
            if reason is not None:
                self.stop(reason)
                return
            time.sleep(_WATCH_S)


class ConnectionWatch:
    """Whether a connecting ZeroMQ socket has a connection now, from its monitor, kept up to date
    by a thread (a GPU worker's main thread is busy in iterations or blocked on a receive).

    ``connected`` is the state; ``close()`` ends the thread and closes the monitor socket (it must go
    before the context is terminated, which would otherwise wait for it forever)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.connected = False
        self.connects = 0   # connections made so far (a reconnection is a new gateway)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                if not self._monitor.poll(int(_WATCH_S * 1000)):
                    continue
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_CONNECTED:
                    self.connected = True
                    self.connects += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    self.connected = False
        finally:
            self._monitor.close(linger=0)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2.0)
        self.sock.disable_monitor()
