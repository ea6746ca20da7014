"""The engine core's process: started by the API server (``neo gateway``) as its child, with the
same flags; connects to the API server's socket in the replica's private runtime directory, binds
the worker links, and runs the engine core until the API server says ``ShutdownCore`` or goes away.

It dies with its parent (the kernel's parent-death signal, SIGKILL: a gateway killed without a
drain leaves its workers up, waiting for the gateway that replaces it). Signals follow the
workers' policy (``neo_common.shutdown.SignalStop``): in a pod every process gets SIGTERM at once
while the API server drains, so the core serves on until ``ShutdownCore``, a second signal, its
parent's death or the grace's end, and then stops as on ``ShutdownCore`` (the workers are told to
shut down first). It runs in a process group of its own, so a terminal's Ctrl-C reaches the API
server alone, which drains and then stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Sequence

import zmq
import zmq.asyncio

from neo_common import event_loop
from neo_common.config import NeoConfig
from neo_common.engine_core_protocol import (PARENT_ENV, AbortRequests, AddRequest, ShutdownCore, StatsRequest,
                                             core_address, decode, finish_reason, pair_socket)
from neo_common.model_source import resolve
from neo_common.protocol import Message, ProtocolError
from neo_common.procs import die_with_parent
from neo_common.shutdown import SignalStop
from neo_gateway.engine_core import EngineCore
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

async def serve(config: NeoConfig) -> None:
    source = resolve(config.model)
    tokenizer = TextTokenizer.load(source.tokenizer_kind, source.tokenizer_path)
    ctx = zmq.asyncio.Context()
    sock = pair_socket(ctx)
    sock.connect(core_address(config.runtime_dir))   # the connecting side queues from the start

    def emit(msg: Message) -> None:
        sock.send(msg.encode())   # a PAIR without a high-water mark takes it at once

    core = EngineCore(config, tokenizer, ctx, source.served_name, emit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    SignalStop("engine core", config.http.shutdown_grace_s, lambda: True,
               lambda _why: loop.call_soon_threadsafe(stop.set)).install()
    core.start()
    reader = asyncio.ensure_future(_read(sock, core, stop))
    try:
        await stop.wait()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await core.stop()
        sock.close()
        ctx.term()


async def _read(sock: zmq.asyncio.Socket, core: EngineCore, stop: asyncio.Event) -> None:
    """Apply the API server's messages in order; a frame that does not decode is a bug on the
    other side (the socket is private to the replica): logged and dropped."""
    while True:
        frame = await sock.recv()
        try:
            msg = decode(frame)
        except ProtocolError as exc:
            log.error("dropped a frame from the API server: %s", exc)
            continue
        if isinstance(msg, ShutdownCore):
            log.info("the API server asked the engine core to stop (%s)", msg.reason)
            stop.set()
            return
        try:
            _apply(core, msg)
        except Exception as exc:  # noqa: BLE001 (a dead reader would wedge the core: no adds, aborts, stops)
            log.exception("applying the API server's %s failed", type(msg).__name__)
            if isinstance(msg, AddRequest):
                core.forget_and_fail(msg.seq_id, f"internal error: {type(exc).__name__}: {exc}")


def _apply(core: EngineCore, msg: Message) -> None:
    if isinstance(msg, AddRequest):
        core.add(msg)
    elif isinstance(msg, AbortRequests):
        core.abort_requests(msg.seq_ids.tolist(), finish_reason(msg.finish))
    elif isinstance(msg, StatsRequest):
        core.emit(core.status(msg.request_id))
    else:
        log.error("dropped a %s from the API server (not a request to the core)", type(msg).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if parent and not die_with_parent(signal.SIGKILL, parent):
        return 1   # the API server died while this process started
    config = NeoConfig.for_process("neo engine-core", __doc__, argv, "engine-core")
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
