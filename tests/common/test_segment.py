"""Segment layout, header validation, stale cleanup and the doorbell words (one process)."""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import pytest

from neo_common.geometry import lookup
from neo_common.host_kernel import _native
from neo_common.segment import (HEADER_BYTES, KvSegment, SegmentError, SegmentLayout, job_seq,
                                       remove_stale)

LAYOUT = SegmentLayout(num_layers=2, num_blocks=10, num_kv_heads=3, num_q_heads=9, head_dim=64, max_rows=4)


@pytest.fixture
def name():
    n = f"neo-test-{uuid.uuid4().hex[:10]}"
    yield n
    remove_stale(n)


def test_layout_is_aligned_and_disjoint():
    lay = SegmentLayout.for_model(lookup("llama-3-8b"), num_blocks=100, block_size=16, max_rows=256,
                                  dtype="bfloat16")
    regions = [lay.region("k_pool"), lay.region("v_pool")]
    regions += [lay.region(p, s) for s in range(lay.num_slots) for p in ("q", "k_new", "v_new", "o")]
    spans = sorted((off, off + 2 * int(np.prod(shape))) for off, shape in regions)
    assert spans[0][0] == HEADER_BYTES
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert all(off % 4096 == 0 for off, _ in spans)
    assert spans[-1][1] <= lay.total_bytes
    assert lay.pool_shape == (32, 100, 8, 16, 128)
    assert lay.attn_scale == pytest.approx(128**-0.5)


def test_create_attach_share_memory_and_validate(name):
    with KvSegment.create(name, LAYOUT) as seg:
        other = KvSegment.attach(name, expect=LAYOUT)
        assert other.layout == LAYOUT and other.nonce == seg.nonce and not other.owner
        seg.k_pool()[1, 3, 2, 5, 7] = 1234
        assert other.k_pool()[1, 3, 2, 5, 7] == 1234
        other.view("o", 1)[3] = 7
        assert (seg.view("o", 1)[3] == 7).all()
        with pytest.raises(SegmentError, match="geometry"):
            KvSegment.attach(name, expect=SegmentLayout(2, 11, 3, 9, 64, max_rows=4))
        other.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_attach_waits_for_the_creator_and_times_out(name):
    with pytest.raises(SegmentError, match="not ready"):
        KvSegment.attach(name, timeout_s=0.1)
    timer = threading.Timer(0.2, lambda: KvSegment.create(name, LAYOUT))
    timer.start()
    seg = KvSegment.attach(name, timeout_s=10)
    timer.join()
    assert seg.layout == LAYOUT
    seg.close()


def test_stale_segment_is_replaced_and_only_its_owner_unlinks(name):
    old = KvSegment.create(name, LAYOUT)
    old.close()                          # "crashed": left behind under the replica's name
    new = KvSegment.create(name, LAYOUT)  # next start cleans it up
    assert new.nonce != old.nonce
    assert not old.unlink()               # the old incarnation must not remove the new one
    assert os.path.exists(f"/dev/shm/{name}")
    assert new.unlink()
    assert not os.path.exists(f"/dev/shm/{name}")
    new.close()


def test_corrupt_header_is_refused(name):
    seg = KvSegment.create(name, LAYOUT)
    seg.buf[8:12] = np.frombuffer(np.uint32(99).tobytes(), np.uint8)   # version
    with pytest.raises(SegmentError, match="version"):
        KvSegment.attach(name)
    seg.close()


def test_doorbell_words(name):
    with KvSegment.create(name, LAYOUT) as seg:
        seq = job_seq(5, 3)
        assert seq == (5 << 16) | 4 == _native.job_seq(5, 3)
        seg.ring(1, seq)
        assert seg.req_seq(1) == seq and seg.req_seq(0) == 0
        with pytest.raises(TimeoutError):
            seg.wait_done(1, seq, timeout_s=0.05)
        done = seg.base_address + seg.layout.done_off(1)
        threading.Timer(0.05, lambda: _native.store_u64(done, seq)).start()
        assert seg.wait_done(1, seq, timeout_s=5) == 0
        seg.abort(5)
        assert seg._word(512) == job_seq(5, 0)
