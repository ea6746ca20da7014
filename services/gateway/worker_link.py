"""The gateway's end of one worker link: bind, register one peer, request/response, liveness.

The gateway binds and the workers connect, so a restarted worker finds the gateway where it was.
Who may connect at all is ``neo_common.link``'s business (a private directory, or CurveZMQ on tcp);
this module decides which of the connected peers the gateway talks to (docs/design.md, "The process
link"):

- The socket is a ROUTER, so every frame names its sender and every send names its receiver: a
  second peer never receives plans meant for the registered one (a DEALER would deal them out).
- The first peer that says ``Hello`` with this link's role is registered (over ``ipc://`` only if
  the kernel says it runs as this user); until it goes away every other peer is dropped and
  counted (``rejected``), without touching the registered one. Only the registered peer's
  disconnect marks the role down: the socket monitor reports disconnects by file descriptor, and
  each frame carries the descriptor it came from (``SRCFD``), which ties the two together.
- Every reply is matched by ``iteration_id`` to a call still waiting for it; anything else (a late
  reply after a timeout, a reply to nothing) is dropped and counted. No frame, however malformed,
  can stop the receive loop.
- A call that times out marks the role down and asks the registered peer to register again (a
  ``Hello``): a worker that was only slow answers with a fresh ``WorkerReady`` and the replica
  recovers by itself.
- A ``WorkerReady`` is checked against the configuration before it is believed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from neo_common.link import LinkKeys, secure_bind
from neo_common.protocol import Hello, Message, ProtocolError, WorkerError, WorkerKind, WorkerReady, decode

log = logging.getLogger(__name__)


class WorkerDown(RuntimeError):
    """The worker died, hung past its timeout, or reported a fatal error."""


class IterationFailed(RuntimeError):
    """The worker could not run one iteration but is still serving (e.g. a plan it rejected)."""


class RejectReason:
    """Why the link dropped a frame: the ``reason`` label of ``neo:link_frames_rejected_total``."""

    UNREADABLE = "unreadable"              # not a frame of this protocol (or another version)
    UNREGISTERED_PEER = "unregistered_peer"  # a peer other than the registered one
    WRONG_ROLE = "wrong_role"              # a Hello/WorkerReady of another kind of worker
    INVALID_READY = "invalid_ready"        # a WorkerReady that does not fit the configuration
    UNEXPECTED = "unexpected"              # a reply nobody waits for (late, or never asked)
    UNAUTHENTICATED = "unauthenticated"    # a tcp peer without the replica's client key (ZAP)
    FOREIGN_USER = "foreign_user"          # an ipc peer running as another user


ReadyCheck = Callable[[WorkerReady], "str | None"]


class WorkerLink:
    """Connection state of one worker role.

    - ``peer``: routing id of the registered worker (None until one said Hello, and after it left);
      ``peer_fd``: the descriptor of its connection (its disconnect event names it).
    - ``ready``: the registered worker's last valid WorkerReady (None until then, and while down).
    - ``generation``: bumps every time the role goes down, so a reply from before is never used.
    - ``ready_event``: set while ``ready`` is not None.
    - ``rejected``: frames dropped, by reason (a Counter; the metrics render it).
    - ``_waiting``: iteration id -> future of the call waiting for that reply, from the send to
      the ``reply()`` that reads it (the answer may come first: it waits in the future).
    - ``errors``: one-way error reports of the worker that no call waited for (``drain()``).
    """

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, name: str, kind: WorkerKind, timeout_s: float,
                 check_ready: ReadyCheck | None = None, keys: LinkKeys | None = None) -> None:
        self.name, self.addr, self.kind, self.timeout_s = name, addr, kind, timeout_s
        self.check_ready = check_ready
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a send to a peer that left raises, never vanishes
        self.keys = keys
        monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor = zmq.Socket.shadow(monitor.underlying)   # read without blocking, in frame order
        self._monitor_async = monitor
        self.peer: bytes | None = None
        self.peer_fd = -1
        self.ready: WorkerReady | None = None
        self.generation = 0
        self.ready_event = asyncio.Event()
        self.rejected: collections.Counter[str] = collections.Counter()
        self._down = asyncio.Event()
        self._waiting: dict[int, asyncio.Future] = {}
        self.errors: collections.deque[WorkerError] = collections.deque(maxlen=1024)
        self.on_down: list = []  # callbacks(reason) run when the worker goes away

    def start(self) -> None:
        """Bind and serve (on tcp, the context's ZAP handler must run by now: without one, libzmq
        would admit any CurveZMQ client)."""
        secure_bind(self.sock, self.addr, self.keys, zap_domain=self.name)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]

    async def close(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        await asyncio.gather(*getattr(self, "_tasks", []), return_exceptions=True)
        self.sock.disable_monitor()
        self._monitor_async.close(linger=0)
        self.sock.close(linger=0)

    @property
    def alive(self) -> bool:
        return self.ready is not None

    @property
    def connected(self) -> bool:
        return self.peer is not None

    # -- receiving ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Notice the registered worker's disconnect while no frame arrives (an idle worker died)."""
        while True:
            try:
                await self._monitor_async.poll()
                self._drain_monitor()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (keep watching)
                log.exception("%s: socket monitor failed", self.name)
                await asyncio.sleep(0.1)

    def _drain_monitor(self) -> None:
        """Apply every disconnect reported so far, before the next frame is looked at: a new
        connection may reuse the descriptor of one that just closed."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and event["value"] == self.peer_fd and self.peer is not None:
                self.peer, self.peer_fd = None, -1
                self._mark_down(f"{self.name} disconnected")

    async def _receive(self) -> None:
        while True:
            try:
                parts = await self.sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:   # the socket itself failed: nothing to read, but never end the loop
                log.exception("%s: receive failed", self.name)
                await asyncio.sleep(0.1)
                continue
            try:
                self._drain_monitor()
                await self._on_frames(parts)
            except Exception:  # noqa: BLE001 (a bug here must not silence the link for good)
                log.exception("%s: dropping a frame that could not be handled", self.name)
                self._reject(RejectReason.UNREADABLE, None)

    async def _on_frames(self, parts: list[zmq.Frame]) -> None:
        peer = parts[0].bytes
        if len(parts) != 2:
            self._reject(RejectReason.UNREADABLE, peer, f"{len(parts)} frames")
            return
        frame, fd = parts[1].bytes, parts[1].get(zmq.SRCFD)
        if self.peer is not None and peer != self.peer:
            self._reject(RejectReason.UNREGISTERED_PEER, peer)
            return
        try:
            msg = decode(frame)
        except ProtocolError as exc:
            self._reject(RejectReason.UNREADABLE, peer, str(exc))
            return
        if self.peer is None:
            await self._register(peer, fd, msg)
            return
        await self._on_message(msg)

    async def _register(self, peer: bytes, fd: int, msg: Message) -> None:
        """A peer speaks while no worker of this role is registered: only a Hello (or a Ready) of
        the right kind, from this user when over ipc, registers it."""
        if not isinstance(msg, (Hello, WorkerReady)):
            self._reject(RejectReason.UNREGISTERED_PEER, peer, f"{type(msg).__name__} before Hello")
            return
        if msg.kind != self.kind:
            self._reject(RejectReason.WRONG_ROLE, peer, f"kind {msg.kind}")
            return
        creds = _peer_credentials(fd) if self.addr.startswith("ipc://") else None
        if creds is not None and creds[1] != os.geteuid():
            self._reject(RejectReason.FOREIGN_USER, peer, f"pid {creds[0]} runs as uid {creds[1]}")
            return
        self.peer, self.peer_fd = peer, fd
        log.info("%s registered (pid %s)", self.name, creds[0] if creds else msg.pid)
        if isinstance(msg, WorkerReady):
            self._on_ready(msg)
        else:
            await self._ask_ready()

    async def _on_message(self, msg: Message) -> None:
        if isinstance(msg, WorkerReady):
            self._on_ready(msg)
        elif isinstance(msg, Hello):
            if msg.kind != self.kind:
                self._reject(RejectReason.WRONG_ROLE, self.peer, f"kind {msg.kind}")
            elif self.ready is None:
                await self._ask_ready()   # a reconnected worker; it answers with a Ready once loaded
        elif isinstance(msg, WorkerError) and msg.fatal:
            self._mark_down(f"{self.name} failed: {msg.message}")
        else:
            iteration_id = getattr(msg, "iteration_id", None)
            # kept until reply() reads it: a plan sent ahead is often answered before its reply()
            future = self._waiting.get(iteration_id) if isinstance(iteration_id, int) else None
            if future is not None and not future.done():
                future.set_result(msg)
            elif isinstance(msg, WorkerError):
                self.errors.append(msg)   # a one-way peer's report (cpu_attention)
            else:
                self._reject(RejectReason.UNEXPECTED, self.peer,
                             f"{type(msg).__name__} for iteration {iteration_id}, which no call waits for")

    def _on_ready(self, msg: WorkerReady) -> None:
        if msg.kind != self.kind:
            self._reject(RejectReason.WRONG_ROLE, self.peer, f"WorkerReady of kind {msg.kind}")
            return
        why = self.check_ready(msg) if self.check_ready is not None else None
        if why:
            self._reject(RejectReason.INVALID_READY, self.peer, why)
            return
        if self.ready is None:
            log.info("%s ready: pid %d, %d blocks on %s (%s)", self.name, msg.pid, msg.num_gpu_blocks,
                     msg.device, msg.dtype)
        self.ready = msg
        self._down.clear()
        self.ready_event.set()

    async def _ask_ready(self) -> None:
        await self._send_to_peer(Hello(pid=0).encode())

    def _reject(self, reason: str, peer: bytes | None, detail: str = "") -> None:
        self.rejected[reason] += 1
        who = "the registered worker" if peer is not None and peer == self.peer else "another peer"
        log.warning("%s: dropped a frame from %s (%s%s)", self.name, who, reason, f": {detail}" if detail else "")

    def _mark_down(self, reason: str) -> None:
        was_ready = self.ready is not None
        self.ready = None
        self.ready_event.clear()
        self.generation += 1
        self._down.set()
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        if was_ready:
            log.error("%s", reason)
            for callback in self.on_down:
                callback(reason)

    def retire(self) -> None:
        """The worker was told to Shutdown: its coming disconnect is the expected end, not a failure
        (no error, no requests failed), and nothing more is sent to it."""
        self.ready = None
        self.ready_event.clear()

    # -- sending ------------------------------------------------------------------------------
    async def _send_to_peer(self, frame) -> bool:
        peer = self.peer
        if peer is None:
            return False
        try:
            await self.sock.send_multipart([peer, frame], copy=False)
            return True
        except zmq.ZMQError as exc:   # EHOSTUNREACH: it left between our look and the send
            log.warning("%s: send failed: %s", self.name, exc)
            return False

    async def send(self, msg: Message, awaits_reply: bool = False) -> None:
        """Send to the registered worker; ``awaits_reply``: a later ``reply()`` waits for the answer
        to this message's ``iteration_id``."""
        if self.ready is None:
            raise WorkerDown(f"{self.name} is not ready")
        if awaits_reply:
            self._waiting[msg.iteration_id] = asyncio.get_running_loop().create_future()
        if not await self._send_to_peer(msg.encode()):
            if awaits_reply:   # (a one-way message of the same iteration leaves its plan's call alone)
                self._waiting.pop(msg.iteration_id, None)
            raise WorkerDown(f"{self.name} went away")

    def drain(self) -> list[WorkerError]:
        """Error reports the worker sent that no call waited for (a one-way peer's)."""
        out = list(self.errors)
        self.errors.clear()
        return out

    async def call(self, msg: Message) -> Message:
        """Send one message and wait for the worker's reply to it, its death, or the timeout."""
        generation = self.generation
        await self.send(msg, awaits_reply=True)
        return await self.reply(generation, msg.iteration_id)

    async def reply(self, generation: int, iteration_id: int) -> Message:
        """The worker's reply to iteration ``iteration_id`` (sent with ``awaits_reply``), provided
        the role did not go down since ``generation``; raises WorkerDown otherwise."""
        future = self._waiting.get(iteration_id)
        if future is None or generation != self.generation:
            raise WorkerDown(f"{self.name} went away during the call")
        down = asyncio.ensure_future(self._down.wait())
        try:
            done, _ = await asyncio.wait({future, down}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            if self._waiting.get(iteration_id) is future:   # answered, timed out or down: a second answer is unexpected
                del self._waiting[iteration_id]
        if future in done and not future.cancelled() and generation == self.generation:
            reply = future.result()
            if isinstance(reply, WorkerError):
                raise IterationFailed(f"{self.name}: {reply.message}")
            return reply
        if not done:
            self._mark_down(f"{self.name} gave no answer to iteration {iteration_id} within "
                            f"{self.timeout_s:.0f}s; asking it to register again")
            await self._ask_ready()
        raise WorkerDown(f"{self.name} went away during the call")


def _peer_credentials(fd: int) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED), None if unknown."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
        return pid, uid
    except OSError:
        return None
