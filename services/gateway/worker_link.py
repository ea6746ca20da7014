"""The gateway's end of one worker connection: bind, handshake, request/response, liveness.

The gateway binds and workers connect, so a restarted worker finds the gateway where it was. A
socket monitor reports TCP disconnects at once (a dead worker closes its socket), and a per-call
timeout catches a worker that hangs without dying.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from neo_common.protocol import Hello, Message, WorkerError, WorkerReady, decode

log = logging.getLogger(__name__)


class WorkerDown(RuntimeError):
    """The worker died, hung past its timeout, or reported a fatal error."""


class IterationFailed(RuntimeError):
    """The worker could not run one iteration but is still serving (e.g. a plan it rejected)."""


class WorkerLink:
    """Connection state of one worker process.

    - ``ready``: the worker's last WorkerReady (None until it has loaded, and after it went away).
    - ``connected``: a TCP peer is attached (it may still be loading).
    - ``generation``: bumps on every disconnect, so a reply from a dead incarnation is never used.
    - ``ready_event``: set while ``ready`` is not None.
    """

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, name: str, timeout_s: float) -> None:
        self.name, self.addr, self.timeout_s = name, addr, timeout_s
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(addr)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.ready: WorkerReady | None = None
        self.connected = False
        self.generation = 0
        self.ready_event = asyncio.Event()
        self._down = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.on_down: list = []  # callbacks(reason) run when the worker goes away

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._receive())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)

    @property
    def alive(self) -> bool:
        return self.ready is not None

    async def _watch(self) -> None:
        while True:
            event = await recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.connected = True
                log.info("%s connected", self.name)
                await self.sock.send(Hello(pid=0).encode())  # ask a (re)connected worker to say Ready
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._mark_down(f"{self.name} disconnected")

    async def _receive(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                msg = decode(frame)
            except ValueError as exc:
                log.error("%s sent an unreadable frame: %s", self.name, exc)
                continue
            if isinstance(msg, WorkerReady):
                if self.ready is None:
                    log.info("%s ready: pid %d, %d blocks on %s (%s)", self.name, msg.pid,
                             msg.num_gpu_blocks, msg.device, msg.dtype)
                self.ready = msg
                self._down.clear()
                self.ready_event.set()
            elif isinstance(msg, Hello):
                continue
            elif isinstance(msg, WorkerError) and msg.fatal:
                self._mark_down(f"{self.name} failed: {msg.message}")
                await self._inbox.put(msg)
            else:
                await self._inbox.put(msg)

    def _mark_down(self, reason: str) -> None:
        was_ready = self.ready is not None
        self.ready = None
        self.ready_event.clear()
        self.generation += 1
        self._down.set()
        while not self._inbox.empty():
            self._inbox.get_nowait()
        if was_ready:
            log.error("%s", reason)
            for callback in self.on_down:
                callback(reason)

    async def send(self, msg: Message) -> None:
        if self.ready is None:
            raise WorkerDown(f"{self.name} is not ready")
        await self.sock.send(msg.encode(), copy=False)

    def drain(self) -> list[Message]:
        """Messages the worker sent that no call waited for (a one-way peer's error reports)."""
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    async def call(self, msg: Message) -> Message:
        """Send one message and wait for the worker's reply, its death, or the timeout."""
        generation = self.generation
        await self.send(msg)
        return await self.reply(generation)

    async def reply(self, generation: int) -> Message:
        """The worker's next reply (replies come in the order of the messages sent), provided it
        is still the incarnation ``generation`` it was sent to; raises WorkerDown otherwise."""
        get = asyncio.ensure_future(self._inbox.get())
        down = asyncio.ensure_future(self._down.wait())
        try:
            done, _ = await asyncio.wait({get, down}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        if get in done and generation == self.generation:
            reply = get.result()
            if isinstance(reply, WorkerError):
                if reply.fatal:
                    raise WorkerDown(f"{self.name}: {reply.message}")
                raise IterationFailed(f"{self.name}: {reply.message}")
            return reply
        get.cancel()
        if not done:
            self._mark_down(f"{self.name} gave no answer within {self.timeout_s:.0f}s")
        raise WorkerDown(f"{self.name} went away during the call")
