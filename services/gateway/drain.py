"""Graceful shutdown of the gateway: SIGTERM or SIGINT drains the replica instead of dropping it.

A rollout sends SIGTERM to every container of a pod at once (and `neo serve` forwards its own to the
gateway). From that moment ``/ready`` answers 503, so the Service stops routing here, and new
generation requests get a 503 with Retry-After (the client retries on another replica), while the
requests already in flight, streaming or not, run to their end. Once none is left, or after
``--shutdown-grace-s``, whichever comes first, the ones still running end with an error event (never
a silent truncation), the engine tells the workers to shut down and the process exits 0.

uvicorn's own handling of SIGTERM would close the listening socket at once (so ``/ready`` could not
say 503) and re-raise the signal after its shutdown (the process would end by the signal, not 0);
``DrainingServer`` replaces it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import time

import uvicorn
from starlette.responses import JSONResponse

from neo_gateway.errors import error_body

log = logging.getLogger(__name__)

# Requests the drain refuses once it began, and waits for while they run.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_FLUSH_S = 5.0        # after the grace, requests ended with an error get this long to send it
_RETRY_AFTER_S = "5"  # a client retrying here sooner finds the replica gone or still draining


class DrainPhase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"   # /ready 503, new generation requests 503, in-flight ones run on
    EXPIRED = "expired"     # the grace is over: the requests still running were ended with an error


class Drain:
    """The gateway's shutdown state, shared by the HTTP middleware and the server.

    - ``phase``: SERVING until the first SIGTERM/SIGINT, then DRAINING, then EXPIRED if the grace
      ran out with requests still running.
    - ``inflight``: generation requests whose response has not ended (counted by the middleware).
    - ``grace_s``: ``--shutdown-grace-s``; ``began_at``: monotonic time of the signal.
    - ``fail_requests``: called with a message when the grace is over; ends every live request with
      that error and returns how many (the engine's ``fail_requests``).
    """

    def __init__(self, grace_s: float, fail_requests) -> None:
        self.grace_s = grace_s
        self.fail_requests = fail_requests
        self.phase = DrainPhase.SERVING
        self.inflight = 0
        self.began_at: float | None = None
        self._changed = asyncio.Event()
        self._forced = False

    @property
    def draining(self) -> bool:
        return self.phase is not DrainPhase.SERVING

    def begin(self, why: str) -> bool:
        """Start draining (False if it had begun already). Runs in a signal handler: only state."""
        if self.draining:
            return False
        self.phase, self.began_at = DrainPhase.DRAINING, time.monotonic()
        log.info("%s: draining %d in-flight requests (at most %.0f s); /ready and new requests answer 503",
                 why, self.inflight, self.grace_s)
        return True

    def force(self) -> None:
        """End the drain now (a second Ctrl-C): the requests still running end with an error."""
        self._forced = True
        self._changed.set()

    async def run(self) -> None:
        """Wait until no generation request runs, or the grace (or a ``force``) ends the wait; then
        end the rest with an error and give them a moment to send it."""
        assert self.began_at is not None
        deadline = self.began_at + self.grace_s
        await self._wait_idle(deadline)
        if self.inflight:
            self.phase = DrainPhase.EXPIRED
            why = "a second signal" if self._forced else f"--shutdown-grace-s {self.grace_s:g} passed"
            n = self.fail_requests(f"the server is shutting down ({why} before the request finished)")
            log.warning("shutdown: %s with %d requests still running; they end with an error", why, n)
            await self._wait_idle(time.monotonic() + _FLUSH_S)
        log.info("drained in %.1f s", time.monotonic() - self.began_at)

    async def _wait_idle(self, deadline: float) -> None:
        while self.inflight and not self._forced:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def _started(self) -> None:
        self.inflight += 1

    def _ended(self) -> None:
        self.inflight -= 1
        self._changed.set()


class DrainMiddleware:
    """ASGI middleware: counts generation requests in flight; once draining, answers ``/ready`` and
    new generation requests with 503 (``Connection: close``, so keep-alive clients reconnect to a
    replica that serves)."""

    def __init__(self, app, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path == "/ready":
            await JSONResponse({"ready": False, "draining": True}, 503,
                               headers={"Retry-After": _RETRY_AFTER_S})(scope, receive, send)
            return
        if path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = error_body(503, "the server is shutting down; retry on another replica")
            await JSONResponse(body, 503, headers={"Retry-After": _RETRY_AFTER_S, "Connection": "close"})(
                scope, receive, send)
            return
        self.drain._started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain._ended()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain in front of its shutdown: the first SIGTERM/SIGINT starts the
    drain and the server exits when it is done; a second SIGINT ends the drain at once. The signal
    is never re-raised, so a drained gateway exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """Signal handler (main thread, between two steps of the event loop): state changes only;
        the drain itself runs as a task."""
        name = signal.Signals(sig).name
        if not self.started or self._loop is None:
            self.should_exit = True   # still starting: nothing to drain
        elif self.drain.begin(name):
            self._loop.call_soon_threadsafe(self._start_drain)
        elif sig == signal.SIGINT:
            log.info("SIGINT again: ending the drain now")
            self._loop.call_soon_threadsafe(self.drain.force)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
