"""The typed, versioned wire protocol between the gateway and the workers (ZeroMQ + msgpack).

A frame is one message-type byte followed by a msgpack map. Enums travel as integers and arrays as
raw little-endian bytes with an explicit dtype (columnar, so a 256-request plan costs a few
microseconds to pack, not one Python dict per request). Every map carries the protocol version; a
peer with another version is refused at the handshake instead of misreading frames later.

Direction and purpose:
- ``Hello`` (worker -> gateway): a worker process connected; sent until the gateway answers.
- ``WorkerReady`` (gpu_worker -> gateway): model loaded, KV pool sized; carries the geometry.
- ``IterationPlan`` (gateway -> gpu_worker): what to run this iteration, per request.
- ``IterationResult`` (gpu_worker -> gateway): sampled tokens and worker-side timings.
- ``GrammarBitmask`` (gateway -> gpu_worker): the grammar masks of a plan sent before they were known.
- ``CpuAttentionPlan`` (gateway -> cpu_attention): the CPU-resident rows of each sub-batch.
- ``Shutdown`` (gateway -> worker), ``WorkerError`` (worker -> gateway).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import msgpack
import numpy as np

from neo_common.cost_model import CostTables
from neo_common.geometry import ModelGeometry

PROTOCOL_VERSION = 7  # 2: placeholder tokens (async scheduling); 3: min_p, logit_bias, penalty columns; 4: logprobs;
#                      5: grammar bitmask columns (structured outputs); 6: masks that follow their plan;
#                      7: demote runs (prefix-cache copies beside the forward)


class MsgType(enum.IntEnum):
    HELLO = 1
    WORKER_READY = 2
    ITERATION_PLAN = 3
    ITERATION_RESULT = 4
    CPU_ATTENTION_PLAN = 5
    SHUTDOWN = 6
    WORKER_ERROR = 7
    GRAMMAR_BITMASK = 8


class Place(enum.IntEnum):
    """Where a request's KV lives (wholly): decides which pool its block table indexes."""

    GPU = 0
    CPU = 1


class WorkerKind(enum.IntEnum):
    GPU_WORKER = 0
    CPU_ATTENTION = 1


class ProtocolError(ValueError):
    pass


def _arr(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"d": a.dtype.str, "s": list(a.shape), "b": a.tobytes()}


_ARRAY_KINDS = "biuf"   # bool, signed, unsigned, float: never objects, strings or structured records


def _unarr(obj: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(obj["d"])
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise ProtocolError(f"array dtype {obj['d']!r} is not a plain number type")
    if not isinstance(obj["b"], bytes) or not all(isinstance(n, int) and n >= 0 for n in obj["s"]):
        raise ProtocolError("array bytes or shape malformed")
    return np.frombuffer(obj["b"], dtype=dtype).reshape(obj["s"])


def _is_array(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"d", "s", "b"}


def _check_type(cls_name: str, name: str, default: Any, value: Any) -> None:
    """A field's value must have its default's type (ints for ints, maps for maps, ...)."""
    if isinstance(default, np.ndarray):
        ok = isinstance(value, np.ndarray)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ProtocolError(f"{cls_name}.{name}: {type(value).__name__} where {type(default).__name__} belongs")


class Message:
    """Base of every message: dataclass fields <-> msgpack map; ndarray fields travel as raw bytes."""

    TYPE: ClassVar[int]
    VERSION: ClassVar[int] = PROTOCOL_VERSION   # a protocol's messages share theirs

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": self.VERSION}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = _arr(value)
            elif isinstance(value, enum.IntEnum):
                value = int(value)
            elif hasattr(value, "to_dict"):   # a typed part (ModelGeometry, CostTables) travels as its map
                value = value.to_dict()
            body[f.name] = value
        return bytes([self.TYPE]) + msgpack.packb(body, use_bin_type=True)

    @classmethod
    def _decode_body(cls, body: dict[str, Any]) -> "Message":
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in body:
                continue
            value = body[f.name]
            if _is_array(value):
                value = _unarr(value)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            typed = f.metadata.get("from_dict")
            if typed is not None:
                if value is not None and not isinstance(value, dict):
                    raise ProtocolError(f"{cls.__name__}.{f.name}: {type(value).__name__} where a map belongs")
                try:
                    value = typed(value) if value is not None else None
                except Exception as exc:  # the class's own refusal (missing field, other format version)
                    raise ProtocolError(f"{cls.__name__}.{f.name}: {type(exc).__name__}: {exc}") from None
            else:
                _check_type(cls.__name__, f.name, default, value)
            kwargs[f.name] = value
        msg = cls(**kwargs)
        msg.check()
        return msg

    def check(self) -> None:
        """Invariants across fields that a decoded message must hold (raise ProtocolError)."""


@dataclasses.dataclass
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    kind: int = WorkerKind.GPU_WORKER
    pid: int = 0
    rank: int = 0


@dataclasses.dataclass
class WorkerReady(Message):
    """The worker finished loading: the model's whole ``geometry`` (not a tensor-parallel shard's).

    With offloading on, the GPU worker also reports the host pool it created (``num_cpu_blocks``
    blocks in the shared segment) and the ``cost_tables`` of this machine (profiled or loaded from
    the cache), which the gateway's offload policy plans with. Both travel as their maps and are
    parsed back into their classes on decoding, so a Ready whose geometry or tables do not parse is
    an unreadable frame. (The cpu_attention process's Ready carries neither.)
    """

    TYPE: ClassVar[MsgType] = MsgType.WORKER_READY
    kind: int = WorkerKind.GPU_WORKER
    pid: int = 0
    num_gpu_blocks: int = 0
    block_size: int = 16
    max_model_len: int = 0
    geometry: ModelGeometry | None = dataclasses.field(default=None, metadata={"from_dict": ModelGeometry.from_dict})
    device: str = ""
    dtype: str = ""
    kv_dtype: str = ""
    num_cpu_blocks: int = 0
    cost_tables: CostTables | None = dataclasses.field(default=None, metadata={"from_dict": CostTables.from_dict})


PLACEHOLDER_TOKEN = -1
MAX_LOGPROBS = 20   # top logprobs per token at most (vLLM's default max_logprobs; OpenAI's limit)


@dataclasses.dataclass
class IterationPlan(Message):
    """One iteration, columnar over its B requests (row i describes request ``seq_ids[i]``).

    - ``num_tokens[i]`` tokens of ``token_ids`` (concatenated, in row order) are fed at positions
      ``start_pos[i] ..``; a prompt chunk during prefill, the last sampled token during decode.
      ``PLACEHOLDER_TOKEN`` stands for the token the worker sampled for that request in the
      previous iteration, unknown to the gateway when it scheduled this one (async scheduling;
      decode rows of GPU-only plans only).
    - ``block_tables`` is ``[B, max_blocks]`` (padded with -1) into the pool named by ``places[i]``.
    - ``sample[i]``: sample a token after this row's last position (false for non-final chunks).
    - ``sub_batch[i]``: 0 or 1, the pipeline sub-batch (all 0 in sequential mode).
    - sampling columns: ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1 = off), ``seeds``
      (-1 = unseeded) and ``steps`` (tokens generated so far; with a seed it makes each step's draw
      reproducible regardless of batch composition), ``min_p`` (0 = off; may be empty: all off).
    - ``bias_rows``/``bias_ids``/``bias_values``: the requests' logit biases, sparse: add
      ``bias_values[j]`` to the logit of token ``bias_ids[j]`` of row ``bias_rows[j]`` (one entry
      per row and token) before sampling, greedy rows too.
    - ``penalties``: ``[B, 3]`` presence, frequency and repetition penalty per row (empty: none),
      over the sparse history ``hist_rows``/``hist_ids``/``hist_output``: each row's generated tokens
      (``hist_output`` 1, one entry per occurrence; a placeholder row's are those before its
      placeholder, which the worker adds) and, for repetition, its prompt tokens (0).
    - ``logprobs``: per row, how many top logprobs to return with the sampled token's (-1: none;
      0: the sampled token's alone); empty when no row asks, so rows that do not ask cost nothing.
    - prompt logprobs, sparse over the rows that ask: row ``plp_rows[j]`` returns, for
      ``plp_count[j]`` of its positions from the ``plp_first[j]``-th token of its chunk on, the
      logprob of the token that follows each (``plp_targets``, concatenated in row order) and the
      top ``plp_k[j]``.
    - ``bitmask_rows``/``bitmask``: structured outputs, over the constrained sampling rows only:
      row ``bitmask_rows[j]`` may sample token ``t`` only if bit ``t % 32`` of ``bitmask[j, t // 32]``
      (int32 words) is set; the others' logits become -inf before sampling. Rows in one grammar
      state share a mask, so ``bitmask`` holds the distinct masks and ``bitmask_index[j]`` names
      row ``bitmask_rows[j]``'s (empty: one mask per row, in order). With ``bitmask_deferred``
      the masks are not known yet (their rows are placeholders of a plan scheduled ahead: each
      mask needs the token the previous plan samples): ``bitmask`` is empty and a ``GrammarBitmask``
      of this iteration follows; the worker queues the forward at once and the sampling when the
      masks come (docs/design.md, "Structured outputs").
    - ``swap_out``/``swap_in``: ``[n, 3]`` runs of (src_block, dst_block, count) copied before the
      forward, GPU->CPU and CPU->GPU pools.
    - ``demote``: ``[n, 3]`` runs of (gpu_block, host_block, count) the prefix cache copies to the
      host tier beside the forward (no row of the plan touches either side); the next plan's work
      starts after them.
    """

    TYPE: ClassVar[MsgType] = MsgType.ITERATION_PLAN
    iteration_id: int = 0
    seq_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    places: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    sub_batch: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    start_pos: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    num_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    token_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    block_tables: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    sample: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    temperature: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    top_p: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    top_k: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    seeds: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    min_p: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    bias_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    bias_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    bias_values: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    penalties: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.float32))
    hist_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    hist_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    hist_output: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int8))
    plp_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    plp_first: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    plp_count: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    plp_k: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int8))
    plp_targets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    bitmask_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    bitmask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    bitmask_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    bitmask_deferred: bool = False
    swap_out: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))
    swap_in: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))
    demote: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))
    trace: dict = dataclasses.field(default_factory=dict)
    t_sent: float = 0.0

    @property
    def batch_size(self) -> int:
        return int(self.seq_ids.shape[0])

    def _check_bitmask(self) -> None:
        r = self.bitmask_rows
        if (r.ndim != 1 or r.dtype.kind not in "iu"
                or (len(r) and not 0 <= int(r.min()) <= int(r.max()) < self.batch_size)
                or len(np.unique(r)) != len(r) or (len(r) and not np.all(self.sample[r.astype(np.int64)]))):
            raise ProtocolError("IterationPlan: bitmask_rows must name distinct sampling rows of the plan")
        if self.bitmask_deferred:
            if not len(r) or self.bitmask.shape != (0, 0) or len(self.bitmask_index):
                raise ProtocolError("IterationPlan: deferred masks name their rows and send no bitmask yet")
        else:
            check_bitmask_words("IterationPlan", self.bitmask, self.bitmask_index, len(r))

    def check(self) -> None:
        n = self.bias_rows.shape
        if (self.bias_ids.shape != n or self.bias_values.shape != n or self.bias_rows.ndim != 1
                or self.bias_rows.dtype.kind not in "iu" or self.bias_ids.dtype.kind not in "iu"
                or (n[0] and not 0 <= int(self.bias_rows.min()) <= int(self.bias_rows.max()) < self.batch_size)
                or (n[0] and int(self.bias_ids.min()) < 0)):
            raise ProtocolError("IterationPlan: bias_rows, bias_ids and bias_values must be vectors of one length "
                                "naming rows of the plan and token ids")
        if self.min_p.shape not in ((0,), (self.batch_size,)):
            raise ProtocolError("IterationPlan: min_p must be empty or one value per row")
        if self.penalties.shape not in ((0, 3), (self.batch_size, 3)):
            raise ProtocolError("IterationPlan: penalties must be empty or [rows, 3]")
        m = self.hist_rows.shape
        if (self.hist_ids.shape != m or self.hist_output.shape != m or self.hist_rows.ndim != 1
                or self.hist_rows.dtype.kind not in "iu" or self.hist_ids.dtype.kind not in "iu"
                or (m[0] and not 0 <= int(self.hist_rows.min()) <= int(self.hist_rows.max()) < self.batch_size)
                or (m[0] and int(self.hist_ids.min()) < 0) or (m[0] and not len(self.penalties))):
            raise ProtocolError("IterationPlan: hist_rows, hist_ids and hist_output must be vectors of one length "
                                "naming rows of a plan with penalties and token ids")
        self._check_bitmask()
        if self.logprobs.shape not in ((0,), (self.batch_size,)) or self.logprobs.dtype.kind not in "iu" or (
                len(self.logprobs) and int(self.logprobs.max()) > MAX_LOGPROBS):
            raise ProtocolError(f"IterationPlan: logprobs must be empty or one count (<= {MAX_LOGPROBS}) per row")
        self._check_prompt_logprobs()

    def _check_prompt_logprobs(self) -> None:
        p = self.plp_rows.shape
        cols = (self.plp_rows, self.plp_first, self.plp_count, self.plp_k, self.plp_targets)
        ok = (all(c.ndim == 1 and c.dtype.kind in "iu" for c in cols)
              and self.plp_first.shape == p and self.plp_count.shape == p and self.plp_k.shape == p)
        if ok and p[0]:
            rows = self.plp_rows.astype(np.int64)
            ok = (0 <= int(rows.min()) and int(rows.max()) < self.batch_size and len(np.unique(rows)) == p[0]
                  and int(self.plp_first.min()) >= 0 and int(self.plp_count.min()) >= 1
                  and 0 <= int(self.plp_k.min()) and int(self.plp_k.max()) <= MAX_LOGPROBS
                  and bool(np.all(self.plp_first + self.plp_count <= self.num_tokens[rows]))
                  and int(self.plp_targets.min()) >= 0)
        if not ok or int(self.plp_count.sum()) != len(self.plp_targets):
            raise ProtocolError("IterationPlan: plp_rows, plp_first, plp_count and plp_k must be vectors of one "
                                "length naming distinct rows and positions of their chunks; plp_targets one "
                                "token id per position")


@dataclasses.dataclass
class IterationResult(Message):
    """Sampled tokens (``token_ids[i]`` for ``seq_ids[i]``, rows with sample=1 only) and timings.

    Times are the worker's own monotonic clock, only ever differenced with each other.
    ``cpu_wait_s``: time the worker's host thread spent waiting on CPU attention beyond the GPU work
    it had queued (0 when the CPU hid behind the GPU: the pipeline balance); ``swap_s``: the swaps.
    On a GPU, ``forward_s`` and ``total_s`` are the device's own time (CUDA events from where the
    device reached the iteration). ``launched_ahead``: the worker launched this plan while the
    previous one was still running (the device had no gap between them).

    Logprobs (plan rows that asked only): ``lp_*`` one row per sampled token of ``lp_seq_ids``: its
    logprob, its rank (1 = likeliest) and the top ``K`` ids and logprobs (``K``: the most any row
    asked; a row keeps its own first k). ``plp_*``: prompt logprobs, ``plp_count[j]`` positions of
    ``plp_seq_ids[j]`` in the order the plan named them, the same per-position columns.
    """

    TYPE: ClassVar[MsgType] = MsgType.ITERATION_RESULT
    iteration_id: int = 0
    seq_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    token_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    forward_s: float = 0.0
    sample_s: float = 0.0
    total_s: float = 0.0
    cpu_wait_s: float = 0.0
    swap_s: float = 0.0
    launched_ahead: bool = False
    lp_seq_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    lp_logprob: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    lp_rank: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    lp_top_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    lp_top_values: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))
    plp_seq_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    plp_count: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    plp_logprob: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    plp_rank: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    plp_top_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    plp_top_values: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def check(self) -> None:
        if (self.seq_ids.ndim != 1 or self.token_ids.shape != self.seq_ids.shape
                or self.seq_ids.dtype.kind not in "iu" or self.token_ids.dtype.kind not in "iu"):
            raise ProtocolError("IterationResult: seq_ids and token_ids must be integer vectors of one length")
        for prefix, n in (("lp", len(self.lp_seq_ids)), ("plp", int(np.sum(self.plp_count)))):
            ids, top = getattr(self, f"{prefix}_top_ids"), getattr(self, f"{prefix}_top_values")
            vectors = (getattr(self, f"{prefix}_logprob"), getattr(self, f"{prefix}_rank"))
            if (any(v.shape != (n,) for v in vectors) or ids.ndim != 2 or ids.shape[0] != n
                    or top.shape != ids.shape or ids.dtype.kind not in "iu"):
                raise ProtocolError(f"IterationResult: {prefix}_* logprob columns do not fit one another")
        if self.plp_count.shape != self.plp_seq_ids.shape:
            raise ProtocolError("IterationResult: plp_seq_ids and plp_count must be of one length")


def check_bitmask_words(cls_name: str, bitmask: np.ndarray, index: np.ndarray, rows: int) -> None:
    """``bitmask``: int32 words, one row per constrained row (``index`` empty) or the distinct rows
    that ``index`` (one entry per constrained row) names."""
    distinct = rows if not len(index) else (int(index.max()) + 1 if index.dtype.kind in "iu" else -1)
    if (bitmask.dtype != np.int32 or bitmask.ndim != 2 or (rows and not bitmask.shape[1])
            or bitmask.shape[0] != distinct or index.ndim != 1 or len(index) not in (0, rows)
            or (len(index) and (index.dtype.kind not in "iu" or int(index.min()) < 0))):
        raise ProtocolError(f"{cls_name}: bitmask must hold int32 words for each of bitmask_rows, or the "
                            "distinct rows bitmask_index names")


@dataclasses.dataclass
class GrammarBitmask(Message):
    """The masks of an ``IterationPlan`` sent with ``bitmask_deferred``: ``bitmask`` and
    ``bitmask_index`` as that plan's would have been, for its ``bitmask_rows`` in that order.
    The gateway sends it
    as soon as the previous plan's tokens have advanced the grammars, and always (an all-ones mask
    for a request that ended meanwhile): the worker holds the plan's sampling until it comes."""

    TYPE: ClassVar[MsgType] = MsgType.GRAMMAR_BITMASK
    iteration_id: int = 0
    bitmask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    bitmask_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    def check(self) -> None:
        rows = len(self.bitmask_index) or (self.bitmask.shape[0] if self.bitmask.ndim == 2 else -1)
        check_bitmask_words("GrammarBitmask", self.bitmask, self.bitmask_index, rows)


@dataclasses.dataclass
class CpuAttentionPlan(Message):
    """The CPU-resident decode rows of one iteration, per sub-batch, in staging-slot order.

    Row r of sub-batch j attends for request ``seq_ids[j][r]`` with ``seq_lens[j][r]`` tokens of
    context (including the token appended this iteration) over CPU-pool blocks
    ``block_tables[j][r]`` (padded with -1).
    """

    TYPE: ClassVar[MsgType] = MsgType.CPU_ATTENTION_PLAN
    iteration_id: int = 0
    seq_ids: list = dataclasses.field(default_factory=list)        # per sub-batch: int64 array
    seq_lens: list = dataclasses.field(default_factory=list)       # per sub-batch: int32 array
    block_tables: list = dataclasses.field(default_factory=list)   # per sub-batch: [B, max_blocks] int32
    trace: dict = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "iteration_id": self.iteration_id,
            "seq_ids": [_arr(np.asarray(a, np.int64)) for a in self.seq_ids],
            "seq_lens": [_arr(np.asarray(a, np.int32)) for a in self.seq_lens],
            "block_tables": [_arr(np.asarray(a, np.int32)) for a in self.block_tables],
            "trace": self.trace,
        }
        return bytes([self.TYPE]) + msgpack.packb(body, use_bin_type=True)

    @classmethod
    def _decode_body(cls, body: dict[str, Any]) -> "CpuAttentionPlan":
        lists = [body["seq_ids"], body["seq_lens"], body["block_tables"]]
        if not all(isinstance(x, list) and len(x) == len(lists[0]) for x in lists):
            raise ProtocolError("CpuAttentionPlan: seq_ids, seq_lens and block_tables must be lists of one length")
        trace = body.get("trace") or {}
        if not isinstance(body["iteration_id"], int) or not isinstance(trace, dict):
            raise ProtocolError("CpuAttentionPlan: iteration_id must be an int and trace a map")
        return cls(
            iteration_id=body["iteration_id"],
            seq_ids=[_unarr(a) for a in body["seq_ids"]],
            seq_lens=[_unarr(a) for a in body["seq_lens"]],
            block_tables=[_unarr(a) for a in body["block_tables"]],
            trace=trace,
        )


@dataclasses.dataclass
class Shutdown(Message):
    TYPE: ClassVar[MsgType] = MsgType.SHUTDOWN
    reason: str = ""


@dataclasses.dataclass
class WorkerError(Message):
    """A worker could not run an iteration (or could not start); the gateway fails what was in it."""

    TYPE: ClassVar[MsgType] = MsgType.WORKER_ERROR
    iteration_id: int = -1
    message: str = ""
    fatal: bool = True


_BY_TYPE: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, WorkerReady, IterationPlan, IterationResult, CpuAttentionPlan, Shutdown, WorkerError,
                GrammarBitmask)
}


def decode(frame: bytes) -> Message:
    """Decode one frame. Raises ProtocolError, and nothing else, on anything that is not a well-formed
    message of this protocol version: an unknown type, another version, a body that is not a map,
    a field of the wrong type, an array of a non-number dtype or a shape that does not fit its bytes."""
    return decode_with(_BY_TYPE, PROTOCOL_VERSION, frame)


def decode_with(types: dict[int, type[Message]], version: int, frame: bytes) -> Message:
    """:func:`decode` for a protocol of these message ``types`` and this ``version``."""
    if not frame:
        raise ProtocolError("empty frame")
    cls = types.get(frame[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {frame[0]}")
    try:
        body = msgpack.unpackb(frame[1:], raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(f"{cls.__name__}: not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__}: body is a {type(body).__name__}, not a map")
    if body.get("v") != version:
        raise ProtocolError(f"{cls.__name__}: protocol version {body.get('v')!r} != {version}")
    try:
        return cls._decode_body(body)
    except ProtocolError:
        raise
    except Exception as exc:  # KeyError, TypeError, ValueError from a malformed field
        raise ProtocolError(f"{cls.__name__}: malformed ({type(exc).__name__}: {exc})") from None
