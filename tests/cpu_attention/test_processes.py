"""Two real processes on one segment: the `neo cpu-attention` process and a GPU-worker stand-in.

The test plays the gateway (a ZeroMQ ROUTER): it receives the Hello, sends CpuAttentionPlans, and
checks that the answers that came back through the doorbell path equal the in-process kernel's, bit
for bit, and that the segment is gone after both exit, also when one of them is killed by PID; with a
real OTLP collector, that the iterations' spans land in the right traces with their timings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import zmq

from neo_common import protocol

from neo_common.host_kernel import _native, kernel
from neo_common.segment import SegmentLayout
from support.otlp import attributes, collector  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration
HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUT = SegmentLayout(num_layers=3, num_blocks=64, num_kv_heads=3, num_q_heads=9, head_dim=64,
                       block_size=16, max_rows=8, dtype="bfloat16", num_slots=2)


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def bf16(rng, shape) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_inputs(folder, rng, ring_delay_s: float = 0.0):
    """Two iterations; slot 0 has 3 rows, slot 1 has 2 rows (the second iteration's lengths + 1)."""
    lay = LAYOUT
    perm = rng.permutation(lay.num_blocks).astype(np.int32)
    lens0 = [[40, 1, 17], [16, 33]]
    tables, off = [], 0
    for lens in lens0:
        t = np.full((len(lens), 5), -1, np.int32)
        for r, n in enumerate(lens):
            nb = (n + 1 + 15) // 16
            t[r, :nb] = perm[off:off + nb]
            off += nb
        tables.append(t)
    iterations = [
        {"iteration_id": 7, "seq_lens": lens0, "block_tables": [t.tolist() for t in tables]},
        {"iteration_id": 8, "seq_lens": [[n + 1 for n in l] for l in lens0],
         "block_tables": [t.tolist() for t in tables]},
    ]
    arrays = {"k_pool": bf16(rng, lay.pool_shape), "v_pool": bf16(rng, lay.pool_shape)}
    for it in range(2):
        for layer in range(lay.num_layers):
            for s, lens in enumerate(lens0):
                arrays[f"q_{it}_{layer}_{s}"] = bf16(rng, (len(lens), lay.num_q_heads, lay.head_dim))
                arrays[f"k_new_{it}_{layer}_{s}"] = bf16(rng, (len(lens), lay.num_kv_heads, lay.head_dim))
                arrays[f"v_new_{it}_{layer}_{s}"] = bf16(rng, (len(lens), lay.num_kv_heads, lay.head_dim))
    np.savez(f"{folder}/inputs.npz", **arrays)
    with open(f"{folder}/meta.json", "w") as f:
        json.dump({"layout": {k: getattr(lay, k) for k in lay.__dataclass_fields__}, "iterations": iterations,
                   "ring_delay_s": ring_delay_s}, f)
    return arrays, iterations


def expected_outputs(arrays, iterations):
    """The same jobs run in this process, in the same order, on copies of the pool."""
    lay = LAYOUT
    k_pool, v_pool = arrays["k_pool"].copy(), arrays["v_pool"].copy()
    out = {}
    for it, plan in enumerate(iterations):
        for layer in range(lay.num_layers):
            for s, lens in enumerate(plan["seq_lens"]):
                out[f"o_{it}_{layer}_{s}"] = kernel.attend(
                    arrays[f"q_{it}_{layer}_{s}"], k_pool[layer], v_pool[layer],
                    np.asarray(plan["block_tables"][s], np.int32), np.asarray(lens, np.int32),
                    k_new=arrays[f"k_new_{it}_{layer}_{s}"], v_new=arrays[f"v_new_{it}_{layer}_{s}"])
    out["k_pool"], out["v_pool"] = k_pool, v_pool
    return out


class Replica:
    """The two processes plus the gateway socket of one test."""

    def __init__(self, tmp_path, grace_s: float = 60.0, env: dict[str, str] | None = None):
        self.name = f"neo-test-{uuid.uuid4().hex[:10]}"
        self.folder = str(tmp_path)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        self.router.bind(f"ipc://{run}/cpu-attention.sock")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.cpu = subprocess.Popen(
            [sys.executable, "-m", "neo_cpu_attention.main", "--runtime-dir", str(run),
             "--shm-name", self.name, "--cpu-threads", "2", "--worker-timeout-s", str(grace_s),
             "--log-level", "info"], env=env, stderr=open(f"{self.folder}/cpu.log", "w"))
        self.driver = subprocess.Popen([sys.executable, f"{HERE}/driver.py", self.folder, self.name],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.identity = None

    def hello(self) -> protocol.Hello:
        assert self.router.poll(30_000), "no Hello from cpu_attention"
        self.identity, frame = self.router.recv_multipart()
        msg = protocol.decode(frame)
        assert isinstance(msg, protocol.Hello)
        return msg

    def send(self, msg: protocol.Message) -> None:
        self.router.send_multipart([self.identity, msg.encode()])

    def recv(self, timeout_ms: int = 10_000) -> protocol.Message | None:
        if not self.router.poll(timeout_ms):
            return None
        return protocol.decode(self.router.recv_multipart()[1])

    def driver_line(self) -> str:
        return self.driver.stdout.readline().strip()

    def driver_go(self) -> None:
        self.driver.stdin.write("go\n")
        self.driver.stdin.flush()

    def close(self) -> None:
        for p in (self.cpu, self.driver):
            if p.poll() is None:
                p.kill()
                p.wait()
        self.router.close(0)
        self.ctx.term()
        if shm_exists(self.name):  # never leave one behind, even when the test failed
            os.unlink(f"/dev/shm/{self.name}")

    def cpu_log(self) -> str:
        return open(f"{self.folder}/cpu.log").read()


def send_plans(rep: Replica, iterations, traces=None) -> None:
    """The plans; row r of sub-batch s is sequence 10 * s + r."""
    for plan, trace in zip(iterations, traces or [{}] * len(iterations)):
        rep.send(protocol.CpuAttentionPlan(
            iteration_id=plan["iteration_id"],
            seq_ids=[np.arange(len(l), dtype=np.int64) + 10 * s for s, l in enumerate(plan["seq_lens"])],
            seq_lens=[np.asarray(l, np.int32) for l in plan["seq_lens"]],
            block_tables=[np.asarray(t, np.int32) for t in plan["block_tables"]], trace=trace))


def test_answers_arrive_through_the_doorbells_and_segment_is_removed(tmp_path):
    arrays, iterations = make_inputs(tmp_path, np.random.default_rng(0))
    _native.set_num_threads(2)   # same split as the child's pool: results must match bit for bit
    expected = expected_outputs(arrays, iterations)
    rep = Replica(tmp_path)
    try:
        hello = rep.hello()
        assert hello.kind == protocol.WorkerKind.CPU_ATTENTION and hello.pid == rep.cpu.pid
        assert rep.driver_line() == "READY"
        assert shm_exists(rep.name)
        send_plans(rep, iterations)
        rep.driver_go()
        assert rep.driver_line() == "DONE", rep.cpu_log()
        got = np.load(f"{tmp_path}/out.npz")
        for key, want in expected.items():
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        ready = rep.recv()
        assert isinstance(ready, protocol.WorkerReady) and ready.kind == protocol.WorkerKind.CPU_ATTENTION
        rep.send(protocol.Shutdown(reason="test"))
        assert rep.cpu.wait(20) == 0
        rep.driver_go()
        assert rep.driver.wait(20) == 0
        assert not shm_exists(rep.name)
    finally:
        rep.close()


@pytest.mark.parametrize("victim", ["driver", "cpu"])
def test_segment_is_gone_after_a_process_is_killed(tmp_path, victim):
    make_inputs(tmp_path, np.random.default_rng(1))
    rep = Replica(tmp_path)
    try:
        rep.hello()
        assert rep.driver_line() == "READY"
        assert isinstance(rep.recv(), protocol.WorkerReady)   # cpu side attached
        if victim == "driver":
            os.kill(rep.driver.pid, signal.SIGKILL)
            rep.driver.wait(10)
            rep.send(protocol.Shutdown(reason="peer died"))
            assert rep.cpu.wait(20) == 0
        else:
            os.kill(rep.cpu.pid, signal.SIGKILL)
            rep.cpu.wait(10)
            rep.driver.stdin.close()     # EOF: the driver skips its jobs' wait and exits
            rep.driver.wait(30)
        assert not shm_exists(rep.name)
    finally:
        rep.close()


def test_exits_when_the_gateway_vanishes(tmp_path):
    make_inputs(tmp_path, np.random.default_rng(2))
    rep = Replica(tmp_path, grace_s=1.5)
    try:
        rep.hello()
        rep.router.close(0)   # the gateway goes away without a Shutdown
        assert rep.cpu.wait(30) == 1
        assert "unreachable" in rep.cpu_log()
    finally:
        rep.driver.kill()
        rep.close()


def test_product_modules_import_no_torch():
    code = ("import sys; import neo_cpu_attention.main, neo_cpu_attention.server, neo_common.segment, "
            "neo_common.host_kernel.kernel, neo_cpu_attention.membw; "
            "from neo_common.config import NeoConfig; from neo_cpu_attention.server import CpuAttentionServer; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _traceparent(n: int) -> str:
    return f"00-{n:032x}-{n:016x}-01"


def _batch_trace(seq_ids: list[int]) -> dict:
    """The gateway's trace map for a batch whose traced requests are ``seq_ids`` (in row order)."""
    parents = [_traceparent(1000 + sid) for sid in seq_ids]
    return {"traceparent": parents[0], "links": parents[1:], "seq_ids": seq_ids}


def test_spans_join_the_traces_of_the_cpu_rows(tmp_path, collector):
    """Through a real OTLP collector: each iteration is a span in the trace of the first traced request
    among its CPU rows (the batch's first traced request runs on the GPU), linked to the other traced
    CPU rows, with the rows, context tokens, kernel time and the time spent waiting for doorbells; each
    traced CPU request gets its own span over its stretch of iterations, in its own trace; a plan
    whose traced requests all run on the GPU makes no iteration span and ends the stretches."""
    delay_s = 0.05
    arrays, iterations = make_inputs(tmp_path, np.random.default_rng(3), ring_delay_s=delay_s)
    rep = Replica(tmp_path, env=collector.env())
    try:
        rep.hello()
        assert rep.driver_line() == "READY"
        # traced: GPU rows 500 and 501, CPU rows 1 (sub-batch 0) and 11 (sub-batch 1), GPU first
        batch = _batch_trace([500, 1, 501, 11])
        send_plans(rep, iterations, [batch, batch])
        rep.send(protocol.CpuAttentionPlan(iteration_id=9, seq_ids=[np.zeros(0, np.int64)] * 2,
                                           seq_lens=[np.zeros(0, np.int32)] * 2,
                                           block_tables=[np.zeros((0, 5), np.int32)] * 2,
                                           trace=_batch_trace([500, 501])))
        rep.driver_go()
        assert rep.driver_line() == "DONE", rep.cpu_log()
        collector.wait_for(lambda spans: sum(s.name.startswith("cpu_attention.") for _, s in spans) >= 4)
        rep.send(protocol.Shutdown(reason="test"))
        assert rep.cpu.wait(20) == 0   # the exit flushes its spans
        time.sleep(1.0)                # rotel forwards in 100 ms batches: anything else has arrived too
        spans = collector.spans()
    finally:
        rep.close()
    assert {svc for svc, _ in spans} == {"neo-cpu-attention"}
    its = sorted((s for _, s in spans if s.name == "cpu_attention.iteration"),
                 key=lambda s: attributes(s)["neo.iteration_id"])
    assert [attributes(s)["neo.iteration_id"] for s in its] == [7, 8], "none for the GPU-only plan 9"
    first_cpu = _traceparent(1001).split("-")
    for span, plan in zip(its, iterations):
        assert span.trace_id.hex() == first_cpu[1] and span.parent_span_id.hex() == first_cpu[2]
        assert [link.span_id.hex() for link in span.links] == [_traceparent(1011).split("-")[2]]
        attrs = attributes(span)
        assert attrs["neo.cpu_status"] == "OK" and attrs["neo.jobs"] == LAYOUT.num_layers * 2
        assert attrs["neo.cpu_rows"] == [3, 2] and attrs["neo.cpu_context_tokens"] == sum(map(sum, plan["seq_lens"]))
        duration_ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
        # every layer's doorbells were held delay_s: the CPU waited at least that long per layer
        assert attrs["neo.cpu_wait_ms"] >= LAYOUT.num_layers * delay_s * 1e3 * 0.9, attrs
        assert 0 < attrs["neo.cpu_busy_ms"] < attrs["neo.cpu_wait_ms"], attrs
        assert attrs["neo.cpu_busy_ms"] + attrs["neo.cpu_wait_ms"] <= duration_ms + 0.5
    requests = {attributes(s)["neo.seq_id"]: s for _, s in spans if s.name == "cpu_attention.request"}
    assert sorted(requests) == [1, 11], "one span per traced CPU request, none for the GPU rows"
    for sid, (slot, row) in {1: (0, 1), 11: (1, 1)}.items():
        span, own = requests[sid], _traceparent(1000 + sid).split("-")
        assert span.trace_id.hex() == own[1] and span.parent_span_id.hex() == own[2], "in its own trace"
        attrs = attributes(span)
        assert (attrs["neo.iterations"], attrs["neo.first_iteration_id"], attrs["neo.last_iteration_id"]) == (2, 7, 8)
        assert attrs["neo.cpu_context_tokens"] == iterations[1]["seq_lens"][slot][row]
        assert attrs["neo.cpu_wait_ms"] == pytest.approx(sum(attributes(s)["neo.cpu_wait_ms"] for s in its))
        assert its[0].start_time_unix_nano <= span.start_time_unix_nano < its[0].end_time_unix_nano
        assert its[1].start_time_unix_nano < span.end_time_unix_nano <= its[1].end_time_unix_nano
