"""The typed boundary between the API server and the engine core (docs/design.md, "The engine core").

The API server process owns HTTP, tokenization, chat templates, detokenization, stop strings and SSE;
the engine core process owns the scheduler, the block managers, the grammars and the worker links.
They talk over one ZeroMQ PAIR socket in the replica's private runtime directory, framed as the
worker protocol is (one type byte and a msgpack map, arrays as raw bytes, ``neo_common.protocol``),
with their own message types and version.

API server -> engine core:
- ``AddRequest``: a tokenized request and its sampling parameters.
- ``AbortRequests``: requests the API server ended (the client left, a stop string matched, the
  drain expired); the core frees them and sends nothing more for them.
- ``StatsRequest``: ``/metrics`` wants a fresh ``EngineStatus``. ``ShutdownCore``: stop.

Engine core -> API server:
- ``EngineCoreOutputs``: one per iteration (and one per failure outside an iteration), columnar:
  per row a request, its new token (-1: none), its finish code (-1: running on); ``details`` for the
  few rows with more (logprobs, an error, the first output's scheduling time); ``iteration``: the
  iteration's timings for the metrics.
- ``EngineStatus``: readiness, limits, the scheduler's and links' counters: sent when readiness
  changes, every ``HEARTBEAT_S`` at least, and in answer to a ``StatsRequest`` (the metrics never
  read the scheduler in place).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import ClassVar

import numpy as np
import zmq

from neo_common.enums import FinishReason
from neo_common.protocol import Message, ProtocolError, decode_with

CORE_SOCKET = "engine-core.sock"


def core_address(runtime_dir: str) -> str:
    """The API server <-> engine core socket (ipc, in the replica's 0700 runtime directory)."""
    return f"ipc://{os.path.join(runtime_dir, CORE_SOCKET)}"


def pair_socket(ctx: zmq.Context) -> zmq.Socket:
    """One PAIR socket per side: a single peer, never a dropped message (no high-water mark)."""
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    return sock


ENGINE_CORE_VERSION = 1
HEARTBEAT_S = 1.0      # the core sends an EngineStatus at least this often
CORE_SILENCE_S = 10.0  # the API server deems a core it has not heard from this long wedged
PARENT_ENV = "NEO_ENGINE_CORE_PARENT"   # the API server's pid, given to the core: it dies with it
NO_TOKEN = -1
RUNNING = -1                         # finish code of a row whose request goes on
FINISH_REASONS = tuple(FinishReason)  # finish code i <-> FINISH_REASONS[i]


def finish_code(reason: FinishReason | None) -> int:
    return RUNNING if reason is None else FINISH_REASONS.index(reason)


def finish_reason(code: int) -> FinishReason | None:
    if code == RUNNING:
        return None
    if not 0 <= code < len(FINISH_REASONS):
        raise ProtocolError(f"finish code {code} is none of {len(FINISH_REASONS)}")
    return FINISH_REASONS[code]


class CoreMsgType(enum.IntEnum):
    ADD_REQUEST = 1
    ABORT_REQUESTS = 2
    STATS_REQUEST = 3
    SHUTDOWN_CORE = 4
    ENGINE_CORE_OUTPUTS = 5
    ENGINE_STATUS = 6


class _CoreMessage(Message):
    VERSION: ClassVar[int] = ENGINE_CORE_VERSION


def _ids() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclasses.dataclass
class AddRequest(_CoreMessage):
    """``params``: SamplingParams' fields (its ``structured_outputs`` as the spec's map), validated
    again by the core. ``arrival``: monotonic seconds (one clock for the processes of a host)."""

    TYPE: ClassVar[int] = CoreMsgType.ADD_REQUEST
    seq_id: int = 0
    request_id: str = ""
    prompt_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    params: dict = dataclasses.field(default_factory=dict)
    arrival: float = 0.0
    traceparent: str = ""

    def check(self) -> None:
        if self.prompt_ids.ndim != 1 or not len(self.prompt_ids) or self.prompt_ids.dtype.kind not in "iu":
            raise ProtocolError("AddRequest: prompt_ids must be a non-empty 1-D integer array")


@dataclasses.dataclass
class AbortRequests(_CoreMessage):
    TYPE: ClassVar[int] = CoreMsgType.ABORT_REQUESTS
    seq_ids: np.ndarray = dataclasses.field(default_factory=_ids)
    finish: int = 0

    def check(self) -> None:
        finish_reason(self.finish)


@dataclasses.dataclass
class StatsRequest(_CoreMessage):
    TYPE: ClassVar[int] = CoreMsgType.STATS_REQUEST
    request_id: int = 0


@dataclasses.dataclass
class ShutdownCore(_CoreMessage):
    TYPE: ClassVar[int] = CoreMsgType.SHUTDOWN_CORE
    reason: str = ""


@dataclasses.dataclass
class EngineCoreOutputs(_CoreMessage):
    """Rows in the order the core produced them (a request's rows keep their order across messages).

    - ``details``: row index -> map with any of ``error`` (str), ``logprob`` ([token, logprob,
      rank, [[id, logprob], ...]]), ``cumulative`` (the output's summed logprob), ``prompt_logprobs``
      (a list of such entries, on the request's first output), ``scheduled`` (monotonic time the
      request was first scheduled, on its first output).
    - ``stop_token``: the row's token is a stop token (its text is left out unless asked for).
    - ``iteration``: the iteration's stats (``IterationStats`` fields), empty for a failure message.
    """

    TYPE: ClassVar[int] = CoreMsgType.ENGINE_CORE_OUTPUTS
    seq_ids: np.ndarray = dataclasses.field(default_factory=_ids)
    token_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    finish: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int8))
    stop_token: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.bool_))
    details: dict = dataclasses.field(default_factory=dict)
    iteration: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        n = len(self.seq_ids)
        if any(a.ndim != 1 or len(a) != n for a in (self.token_ids, self.finish, self.stop_token)):
            raise ProtocolError("EngineCoreOutputs: every column needs one entry per row")
        if any(not isinstance(i, int) or not 0 <= i < n for i in self.details):
            raise ProtocolError("EngineCoreOutputs: details must be keyed by row index")
        for code in set(self.finish.tolist()):
            finish_reason(code)


@dataclasses.dataclass
class IterationStats:
    """One iteration as the metrics see it: the core's wall time from scheduling to the result
    applied, the worker's own time, and the offload plan's predicted and measured forward."""

    wall_s: float = 0.0
    worker_s: float = 0.0
    launched_ahead: bool = False
    num_tokens: int = 0
    plan: str = ""                 # "" (no offload decision), "sequential" or "pipelined"
    predicted_forward_s: float = 0.0
    measured_forward_s: float = 0.0
    cpu_wait_s: float = -1.0       # -1: no CPU rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IterationStats":
        return cls(**d)


@dataclasses.dataclass
class EngineStatus(_CoreMessage):
    """The core's state: readiness and limits (for admission) and the counters ``/metrics`` and
    ``/health`` show. ``request_id``: the ``StatsRequest`` answered (0: sent on a change).
    ``workers``: [name, pid (0: down)] per worker link; ``link_rejections``: link -> reason -> count."""

    TYPE: ClassVar[int] = CoreMsgType.ENGINE_STATUS
    request_id: int = 0
    ready: bool = False
    loop_alive: bool = True
    max_model_len: int = 0
    vocab_size: int = 0
    eos_token_ids: list = dataclasses.field(default_factory=list)
    block_size: int = 16
    gpu_blocks_total: int = 0
    gpu_blocks_free: int = 0
    gpu_usage: float = 0.0
    cpu_blocks_total: int = 0
    cpu_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    decoding_gpu: int = 0
    decoding_cpu: int = 0
    num_preemptions: int = 0
    swapped_out: int = 0
    swapped_in: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens_gpu: int = 0
    prefix_hit_tokens_host: int = 0
    demoted_bytes: int = 0
    promoted_bytes: int = 0
    host_cached_blocks: int = 0
    pipeline_overhead_s: float = 0.0
    worker_up: bool = False
    cpu_attention_up: bool = False
    worker_device: str = ""
    worker_dtype: str = ""
    worker_kv_dtype: str = ""
    num_layers: int = 0
    workers: list = dataclasses.field(default_factory=list)
    link_rejections: dict = dataclasses.field(default_factory=dict)


_BY_TYPE = {cls.TYPE: cls for cls in (AddRequest, AbortRequests, StatsRequest, ShutdownCore, EngineCoreOutputs,
                                       EngineStatus)}


def decode(frame: bytes) -> Message:
    """One frame of this protocol (ProtocolError on anything else)."""
    return decode_with(_BY_TYPE, ENGINE_CORE_VERSION, frame)
