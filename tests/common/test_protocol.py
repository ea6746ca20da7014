import msgpack
import numpy as np
import pytest

from support.cost_tables import synthetic

from neo_common.geometry import GEOMETRIES, ModelGeometry
from neo_common.protocol import (PROTOCOL_VERSION, CpuAttentionPlan, IterationPlan, IterationResult, MsgType,
                                 ProtocolError, Shutdown, WorkerReady, decode)


def test_plan_round_trip_keeps_arrays_dtypes_and_shapes():
    plan = IterationPlan(iteration_id=9, seq_ids=np.array([5, 6], np.int64), start_pos=np.array([0, 40], np.int32),
                         num_tokens=np.array([3, 1], np.int32), token_ids=np.array([1, 2, 3, 4], np.int32),
                         block_tables=np.array([[1, -1, -1], [7, 8, 9]], np.int32), trace={"traceparent": "x"})
    back = decode(plan.encode())
    assert isinstance(back, IterationPlan) and back.iteration_id == 9 and back.trace == {"traceparent": "x"}
    for name in ("seq_ids", "start_pos", "num_tokens", "token_ids", "block_tables"):
        a, b = getattr(plan, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), name


def test_other_messages_round_trip():
    ready = WorkerReady(pid=1, num_gpu_blocks=10, geometry=GEOMETRIES["llama-3-8b"], device="cpu",
                        cost_tables=synthetic())
    back = decode(ready.encode())
    assert back == ready and isinstance(back.geometry, ModelGeometry) and back.cost_tables.key == ready.cost_tables.key
    bad = ready.encode().replace(b"hidden_size", b"hidden_sizX")
    with pytest.raises(ProtocolError, match="geometry"):
        decode(bad)   # a geometry that does not parse makes the frame unreadable
    res = decode(IterationResult(iteration_id=2, seq_ids=np.array([1]), token_ids=np.array([9], np.int32)).encode())
    assert res.token_ids.tolist() == [9]
    cpu = decode(CpuAttentionPlan(3, [np.array([1, 2])], [np.array([5, 6])], [np.zeros((2, 4))]).encode())
    assert cpu.seq_lens[0].tolist() == [5, 6] and cpu.block_tables[0].shape == (2, 4)
    assert decode(Shutdown(reason="bye").encode()).reason == "bye"


def test_foreign_versions_and_types_are_refused():
    body = msgpack.packb({"v": PROTOCOL_VERSION + 1, "reason": "x"})
    with pytest.raises(ProtocolError, match="version"):
        decode(bytes([MsgType.SHUTDOWN]) + body)
    with pytest.raises(ProtocolError, match="unknown"):
        decode(bytes([200]) + body)
    with pytest.raises(ProtocolError):
        decode(b"")
