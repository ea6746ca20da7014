"""The API server <-> engine core messages: round trips, and frames that must be refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from neo_common.engine_core_protocol import (NO_TOKEN, RUNNING, AbortRequests, AddRequest, EngineCoreOutputs,
                                             EngineStatus, IterationStats, decode, finish_code, finish_reason)
from neo_common.enums import FinishReason
from neo_common.protocol import IterationResult, ProtocolError


def test_messages_round_trip():
    add = AddRequest(seq_id=7, request_id="r", prompt_ids=np.array([1, 2, 3], np.int32),
                     params={"max_tokens": 4, "logit_bias": {5: 1.0}, "stop": ["x"]}, arrival=1.5, traceparent="tp")
    back = decode(add.encode())
    assert isinstance(back, AddRequest) and back.prompt_ids.tolist() == [1, 2, 3]
    assert back.params == {"max_tokens": 4, "logit_bias": {5: 1.0}, "stop": ["x"]} and back.traceparent == "tp"
    out = EngineCoreOutputs(seq_ids=np.array([7, 8], np.int64), token_ids=np.array([9, NO_TOKEN], np.int32),
                            finish=np.array([RUNNING, finish_code(FinishReason.ERROR)], np.int8),
                            stop_token=np.zeros(2, np.bool_), details={1: {"error": "boom"}},
                            iteration=IterationStats(wall_s=0.01, plan="sequential").to_dict())
    back = decode(out.encode())
    assert back.details == {1: {"error": "boom"}} and finish_reason(int(back.finish[1])) is FinishReason.ERROR
    assert IterationStats.from_dict(back.iteration).plan == "sequential"
    status = decode(EngineStatus(ready=True, workers=[["gpu_worker", 42]], link_rejections={"gpu_worker": {"x": 1}}).encode())
    assert status.ready and status.workers == [["gpu_worker", 42]]


@pytest.mark.parametrize("frame", [
    EngineCoreOutputs(seq_ids=np.array([1], np.int64)).encode(),                          # columns of other lengths
    EngineCoreOutputs(seq_ids=np.array([1], np.int64), token_ids=np.array([1], np.int32),
                      finish=np.array([9], np.int8), stop_token=np.zeros(1, np.bool_)).encode(),   # no such finish
    EngineCoreOutputs(details={3: {}}).encode(),                                          # a detail of no row
    AbortRequests(seq_ids=np.array([1], np.int64), finish=-5).encode(),
    AddRequest(prompt_ids=np.zeros(0, np.int32)).encode(),                                # an empty prompt
    AddRequest(prompt_ids=np.ones(2, np.float32)).encode(),
])
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


def test_other_protocols_and_versions_are_refused():
    with pytest.raises(ProtocolError):   # a worker message is not an engine core message
        decode(IterationResult(iteration_id=1).encode())
    body = msgpack.packb({"v": 999, "seq_ids": []})
    with pytest.raises(ProtocolError, match="version"):
        decode(bytes([EngineCoreOutputs.TYPE]) + body)
