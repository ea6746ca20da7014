"""The gateway's end of a link against hostile and broken peers, over real ZeroMQ sockets.

The gateway side is the real ``WorkerLink``; the worker and the attackers are plain ZeroMQ (and raw
Unix-socket) peers driven by the test, so every frame they send is chosen. A rogue is dropped and
counted without touching the registered worker; a broken registered worker costs one iteration,
never the link; a slow one is asked to register again and the link recovers by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from neo_common.config import NeoConfig
from neo_common.geometry import ModelGeometry
from neo_common.handshake import check_gpu_worker_ready
from neo_common.link import LinkKeys, prepare_runtime_dir
from neo_common.protocol import (PROTOCOL_VERSION, Hello, IterationPlan, IterationResult, MsgType, WorkerKind,
                                 WorkerReady)
from neo_gateway.worker_link import IterationFailed, RejectReason, WorkerDown, WorkerLink

GEOMETRY = ModelGeometry("tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         intermediate_size=128, vocab_size=1000, max_position_embeddings=512)


def ready(**over) -> WorkerReady:
    fields = dict(kind=WorkerKind.GPU_WORKER, pid=os.getpid(), num_gpu_blocks=32, block_size=16, max_model_len=256,
                  geometry=GEOMETRY, device="cpu", dtype="float32", kv_dtype="float32")
    return WorkerReady(**{**fields, **over})


def result(iteration_id: int, seq_ids=(7,)) -> IterationResult:
    return IterationResult(iteration_id=iteration_id, seq_ids=np.array(seq_ids, np.int64),
                           token_ids=np.arange(len(seq_ids), dtype=np.int32))


def raw(msg_type: MsgType, body) -> bytes:
    return bytes([msg_type]) + msgpack.packb(body, use_bin_type=True)


class Bench:
    """A WorkerLink bound in a private directory (or on tcp), and helpers to make peers."""

    def __init__(self, tmp_path, tcp: bool = False, timeout_s: float = 5.0) -> None:
        self.run = prepare_runtime_dir(str(tmp_path / "run"))
        self.ctx = zmq.asyncio.Context()
        self.keys = LinkKeys.load_or_create(self.run) if tcp else None
        if tcp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.addr = f"tcp://127.0.0.1:{port}"
        else:
            self.addr = f"ipc://{self.run}/worker.sock"
        self.config = NeoConfig.from_args(["--runtime-dir", self.run, "--max-model-len", "256",
                                           "--num-gpu-blocks", "32", "--dtype", "float32"], env={})
        self.auth = None
        if tcp:
            from zmq.auth.asyncio import AsyncioAuthenticator

            from neo_common.link import ClientKeyCheck

            self.auth = AsyncioAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("gpu_worker", credentials_provider=ClientKeyCheck(
                self.keys, lambda domain: self.link.rejected.update([RejectReason.UNAUTHENTICATED])))
        self.link = WorkerLink(self.ctx, self.addr, "gpu_worker", WorkerKind.GPU_WORKER, timeout_s,
                               lambda r: check_gpu_worker_ready(r, self.config), self.keys)
        self.link.start()
        self.peers: list[zmq.asyncio.Socket] = []

    def peer(self, keys: LinkKeys | None = None, server_key: bytes | None = None) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            sock.curve_serverkey = server_key or keys.server_public
            sock.curve_publickey, sock.curve_secretkey = keys.client_public, keys.client_secret
        sock.connect(self.addr)
        self.peers.append(sock)
        return sock

    async def worker(self) -> zmq.asyncio.Socket:
        """A peer that registers and says Ready, as the GPU worker does."""
        sock = self.peer(self.keys)
        await sock.send(Hello(kind=WorkerKind.GPU_WORKER, pid=os.getpid()).encode())
        await sock.send(ready().encode())
        await asyncio.wait_for(self.link.ready_event.wait(), 5)
        while await sock.poll(200):   # the gateway's Hello, asking for a Ready we already sent
            await sock.recv()
        return sock

    async def close(self) -> None:
        for sock in self.peers:
            sock.close(0)
        await self.link.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def run(coro_fn, tmp_path, **kw):
    async def main():
        bench = Bench(tmp_path, **kw)
        try:
            await coro_fn(bench)
        finally:
            await bench.close()
    asyncio.run(asyncio.wait_for(main(), 60))


async def answer(worker: zmq.asyncio.Socket, reply_for=None) -> IterationPlan:
    """Receive one plan on ``worker`` and answer it (with ``reply_for(plan)`` if given)."""
    assert await worker.poll(5000), "the registered worker got no plan"
    from neo_common.protocol import decode

    plan = decode(await worker.recv())
    assert isinstance(plan, IterationPlan)
    await worker.send((reply_for(plan) if reply_for else result(plan.iteration_id)).encode())
    return plan


async def call(bench: Bench, iteration_id: int, worker, reply_for=None):
    task = asyncio.ensure_future(bench.link.call(IterationPlan(iteration_id=iteration_id)))
    await answer(worker, reply_for)
    return await task


def test_a_port_scan_and_a_rogue_hello_never_touch_the_registered_worker(tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        with socket.socket(socket.AF_UNIX) as scan:   # what a port scan does: connect, close
            scan.connect(bench.addr.removeprefix("ipc://"))
        rogue = bench.peer()
        await rogue.send(Hello(kind=WorkerKind.GPU_WORKER, pid=1).encode())   # "I am the GPU worker"
        await rogue.send(ready(pid=1).encode())
        await asyncio.sleep(0.3)
        rogue.close(0)                      # and its disconnect must not mark the real worker down
        await asyncio.sleep(0.3)
        assert bench.link.alive and bench.link.rejected[RejectReason.UNREGISTERED_PEER] == 2
        for i in range(1, 5):               # every plan goes to the registered worker, none to the rogue
            reply = await call(bench, i, worker)
            assert isinstance(reply, IterationResult) and reply.iteration_id == i

    run(scenario, tmp_path)


def test_a_plan_answered_before_its_reply_is_awaited_is_not_lost(tmp_path):
    """Async scheduling sends plan 2 before it awaits plan 1's reply; a fast worker answers both
    before the engine asks for plan 2's. Each reply must be there when asked for (it was taken
    for a worker gone away, failing every running request); a second answer is unexpected."""
    async def scenario(bench: Bench):
        worker = await bench.worker()
        generation = bench.link.generation
        for i in (1, 2):
            await bench.link.send(IterationPlan(iteration_id=i), awaits_reply=True)
        for _ in (1, 2):
            await answer(worker)
        await asyncio.sleep(0.3)            # both answers are in before either reply() call
        for i in (1, 2):
            reply = await bench.link.reply(generation, i)
            assert isinstance(reply, IterationResult) and reply.iteration_id == i
        await worker.send(result(2).encode())   # answered twice
        await asyncio.sleep(0.3)
        assert bench.link.rejected[RejectReason.UNEXPECTED] == 1 and bench.link.alive

    run(scenario, tmp_path)


def test_a_rogue_that_stays_receives_no_plan_and_injects_nothing(tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        rogue = bench.peer()
        await rogue.send(Hello(kind=WorkerKind.GPU_WORKER, pid=1).encode())
        task = asyncio.ensure_future(bench.link.call(IterationPlan(iteration_id=1)))
        await rogue.send(result(1, seq_ids=(7,)).encode())   # a forged answer, before the real one
        await asyncio.sleep(0.2)
        assert not task.done(), "a rogue's reply was taken for the worker's"
        await answer(worker, lambda p: IterationResult(iteration_id=1, seq_ids=np.array([7]),
                                                      token_ids=np.array([42], np.int32)))
        assert (await task).token_ids.tolist() == [42]
        assert not await rogue.poll(300), "the rogue was handed a frame"

    run(scenario, tmp_path)


@pytest.mark.parametrize("junk", [
    raw(MsgType.ITERATION_RESULT, [1, 2, 3]),                                     # a body that is not a map
    raw(MsgType.ITERATION_RESULT, {"v": PROTOCOL_VERSION, "iteration_id": 1,      # an object dtype
                                   "seq_ids": {"d": "|O", "s": [1], "b": b"\0" * 8}}),
    raw(MsgType.ITERATION_RESULT, {"v": PROTOCOL_VERSION, "iteration_id": 1,      # shape beyond its bytes
                                   "seq_ids": {"d": "<i8", "s": [9], "b": b"\0" * 8}}),
    raw(MsgType.ITERATION_RESULT, {"v": PROTOCOL_VERSION, "iteration_id": "1"}),  # a string id
    raw(MsgType.WORKER_READY, {"v": PROTOCOL_VERSION, "kind": 0, "geometry": 5}),
    b"\x04\xc1garbage", bytes([99]) + b"\x80", b"\x04",
], ids=["non-map", "object-dtype", "short-bytes", "string-id", "bad-ready", "not-msgpack", "unknown-type", "empty"])
def test_malformed_frames_from_the_registered_worker_cost_nothing(junk, tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        task = asyncio.ensure_future(bench.link.call(IterationPlan(iteration_id=1)))
        await worker.send(junk)
        await answer(worker)
        assert (await task).iteration_id == 1, "the receive loop survived and matched the real reply"
        assert bench.link.alive and bench.link.rejected[RejectReason.UNREADABLE] >= 1

    run(scenario, tmp_path)


def test_a_reply_to_another_iteration_is_dropped_not_given_to_the_waiting_call(tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        task = asyncio.ensure_future(bench.link.call(IterationPlan(iteration_id=5)))
        await worker.send(result(4).encode())          # nobody waits for 4
        await answer(worker)
        assert (await task).iteration_id == 5
        assert bench.link.rejected[RejectReason.UNEXPECTED] == 1

    run(scenario, tmp_path)


def test_a_ready_that_does_not_fit_the_configuration_is_refused(tmp_path):
    async def scenario(bench: Bench):
        sock = bench.peer()
        await sock.send(Hello(kind=WorkerKind.GPU_WORKER, pid=os.getpid()).encode())
        for bad in (ready(block_size=32), ready(num_gpu_blocks=64), ready(max_model_len=100_000),
                    ready(geometry=dataclasses.replace(GEOMETRY, vocab_size=0)), ready(kv_dtype="float16"), ready(num_cpu_blocks=8),
                    ready(kind=WorkerKind.CPU_ATTENTION)):
            await sock.send(bad.encode())
        await asyncio.sleep(0.5)
        assert not bench.link.alive
        assert bench.link.rejected[RejectReason.INVALID_READY] + bench.link.rejected[RejectReason.WRONG_ROLE] == 7
        await sock.send(ready().encode())
        await asyncio.wait_for(bench.link.ready_event.wait(), 5)

    run(scenario, tmp_path)


def test_a_timed_out_iteration_asks_the_worker_to_register_again_and_recovers(tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        with pytest.raises(WorkerDown):
            await bench.link.call(IterationPlan(iteration_id=1))   # the worker is slow: no answer in time
        assert not bench.link.alive
        from neo_common.protocol import decode

        frames = []
        while await worker.poll(500):
            frames.append(decode(await worker.recv()))
        assert isinstance(frames[0], IterationPlan) and isinstance(frames[-1], Hello), "asked to register again"
        await worker.send(result(1).encode())       # the late answer is dropped...
        await worker.send(ready().encode())         # ...and the fresh Ready adopted
        await asyncio.wait_for(bench.link.ready_event.wait(), 5)
        assert (await call(bench, 2, worker)).iteration_id == 2
        assert bench.link.rejected[RejectReason.UNEXPECTED] == 1

    run(scenario, tmp_path, timeout_s=1.0)


def test_a_failed_iteration_fails_alone(tmp_path):
    async def scenario(bench: Bench):
        from neo_common.protocol import WorkerError

        worker = await bench.worker()
        with pytest.raises(IterationFailed):
            await call(bench, 1, worker, lambda p: WorkerError(iteration_id=1, message="bad plan", fatal=False))
        assert bench.link.alive and (await call(bench, 2, worker)).iteration_id == 2

    run(scenario, tmp_path)


def test_only_the_registered_workers_disconnect_marks_it_down(tmp_path):
    async def scenario(bench: Bench):
        worker = await bench.worker()
        rogue = bench.peer()
        await rogue.send(b"junk")
        await asyncio.sleep(0.2)
        rogue.close(0)
        await asyncio.sleep(0.3)
        assert bench.link.alive
        worker.close(0)
        for _ in range(50):
            if not bench.link.alive:
                break
            await asyncio.sleep(0.05)
        assert not bench.link.alive and bench.link.peer is None
        again = await bench.worker()   # a restarted worker registers
        assert (await call(bench, 3, again)).iteration_id == 3

    run(scenario, tmp_path)


def test_tcp_links_admit_only_the_replicas_key(tmp_path):
    async def scenario(bench: Bench):
        stranger = LinkKeys.generate()   # a client with its own keys and the (leaked) server key
        rogue = bench.peer(stranger, server_key=bench.keys.server_public)
        await rogue.send(Hello(kind=WorkerKind.GPU_WORKER, pid=1).encode())
        plain = bench.ctx.socket(zmq.DEALER)   # and one that does not speak CurveZMQ at all
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(bench.addr)
        bench.peers.append(plain)
        await plain.send(Hello(kind=WorkerKind.GPU_WORKER, pid=1).encode())
        await asyncio.sleep(0.5)
        assert bench.link.peer is None, "an unauthenticated peer registered"
        assert bench.link.rejected[RejectReason.UNAUTHENTICATED] >= 1
        worker = await bench.worker()   # the replica's own key is admitted
        assert (await call(bench, 1, worker)).iteration_id == 1

    run(scenario, tmp_path, tcp=True)


def test_the_runtime_directory_must_be_private(tmp_path):
    from neo_common.link import LinkSecurityError

    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(LinkSecurityError, match="mode 755"):
        prepare_runtime_dir(str(open_dir))
    (tmp_path / "target").mkdir(mode=0o700)
    os.symlink(tmp_path / "target", tmp_path / "link")   # a link planted where the directory goes
    with pytest.raises(LinkSecurityError, match="not a directory"):
        prepare_runtime_dir(str(tmp_path / "link"))
    keys = LinkKeys.load_or_create(prepare_runtime_dir(str(tmp_path / "ok")))
    assert os.stat(tmp_path / "ok" / "link.keys").st_mode & 0o777 == 0o600
    assert LinkKeys.load(str(tmp_path / "ok")).client_public == keys.client_public, "created once, then read"
