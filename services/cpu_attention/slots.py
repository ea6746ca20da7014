"""The staging slots of one iteration as the native serve loop takes them.

``_native.serve_iteration`` reads each slot as a 12-field sequence in the order of ``neo_slot_desc``
(``neo_common/host_kernel/csrc/neo_attn.h``); :class:`SlotDesc` names those fields so Python code
never indexes them by position.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from neo_common.segment import KvSegment


class SlotDesc(NamedTuple):
    """One staging slot for the native loop (a tuple, so the binding reads it as it is).

    Addresses are absolute; ``seq_lens`` / ``block_tables`` point into arrays the caller keeps alive
    for the whole iteration. ``next_layer`` is the only field that changes: the native loop returns
    each slot's first layer not yet served, and the next slice resumes from there.
    """

    req_seq: int          # doorbell word the GPU worker rings (job seq of the staged inputs)
    done_seq: int         # completion word written here
    status: int           # per-job status word written here before done_seq
    q: int                # staging buffers, [max_rows, heads, head_dim]
    k_new: int
    v_new: int
    o: int
    rows: int             # CPU rows of this sub-batch (0: the slot is idle this iteration)
    seq_lens: int         # int32 [rows]
    block_tables: int     # int32 [rows, bt_stride]
    bt_stride: int
    next_layer: int = 0

    @classmethod
    def for_slot(cls, seg: KvSegment, slot: int, seq_lens: np.ndarray, block_tables: np.ndarray) -> "SlotDesc":
        """Slot ``slot`` of ``seg`` serving ``seq_lens`` rows over ``block_tables`` from layer 0."""
        rows = int(seq_lens.shape[0])
        base, lay = seg.base_address, seg.layout
        return cls(req_seq=base + lay.req_off(slot), done_seq=base + lay.done_off(slot),
                   status=base + lay.status_off(slot), q=seg.address("q", slot),
                   k_new=seg.address("k_new", slot), v_new=seg.address("v_new", slot), o=seg.address("o", slot),
                   rows=rows, seq_lens=seq_lens.ctypes.data,
                   block_tables=block_tables.ctypes.data if rows else 0,
                   bt_stride=int(block_tables.shape[1]) if rows else 0)
