"""Every Triton kernel against its torch twin in ``neo_gpu_worker.ops`` (on the CPU through Triton's
interpreter in CI; the GPU benchmark run repeats the comparison on the device)."""

from __future__ import annotations

import pytest
import torch

from neo_gpu_worker import ops

triton = pytest.importorskip("triton")
from neo_gpu_worker.kernels import decode_attention as dk  # noqa: E402
from neo_gpu_worker.kernels import elementwise  # noqa: E402

BF16 = torch.bfloat16
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton's interpreter


def _paged_case(seed: int, lens: list[int], heads: int, kv_heads: int, dim: int, bs: int = 16):
    gen = torch.Generator().manual_seed(seed)
    per_row = [-(-n // bs) for n in lens]
    blocks = sum(per_row) + 3
    k = torch.randn((blocks, bs, kv_heads, dim), generator=gen).to(BF16)
    v = torch.randn((blocks, bs, kv_heads, dim), generator=gen).to(BF16)
    order = torch.randperm(blocks, generator=gen).to(torch.int32)  # rows hold scattered blocks
    tables = torch.full((len(lens), max(per_row) + 2), -1, dtype=torch.int32)
    first = 0
    for i, m in enumerate(per_row):
        tables[i, :m] = order[first:first + m]
        first += m
    q = torch.randn((len(lens), heads, dim), generator=gen).to(BF16)
    return (t.to(DEVICE) for t in (q, k, v, tables, torch.tensor(lens, dtype=torch.int32)))


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 128), (9, 3, 64)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_matches_its_twin(heads, kv_heads, dim, splits):
    # contexts: one token, within a block, across tiles, and a long one whose splits are uneven
    q, k, v, tables, lens = _paged_case(heads + splits, [1, 13, 70, 200], heads, kv_heads, dim)
    want = ops.decode_attention(q, k, v, tables, lens, dim ** -0.5, torch.empty_like(q))
    got = dk.decode_attention(q, k, v, tables, lens, dim ** -0.5, torch.empty_like(q), splits=splits)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("splits", [1, 4])
def test_soft_capped_decode_attention_matches_its_twin(splits):
    """Gemma-2's attention soft-cap (a cap of 1.0 on scores of random q/k changes them a lot)."""
    q, k, v, tables, lens = _paged_case(splits, [1, 70, 200], 8, 2, 64)
    want = ops.decode_attention(q, k, v, tables, lens, 0.125, torch.empty_like(q), softcap=1.0)
    uncapped = ops.decode_attention(q, k, v, tables, lens, 0.125, torch.empty_like(q))
    got = dk.decode_attention(q, k, v, tables, lens, 0.125, torch.empty_like(q), splits=splits, softcap=1.0)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert (want.float() - uncapped.float()).abs().max() > 0.1


def test_decode_attention_writes_strided_rows_in_place():
    """The decode-only path hands the kernel q and out as views of wider buffers (fused QKV)."""
    q, k, v, tables, lens = _paged_case(5, [40, 3], 8, 2, 64)
    wide = torch.zeros((2, 3, 8, 64), dtype=BF16, device=DEVICE)
    wide[:, 1] = q
    out = torch.zeros((2, 2, 8, 64), dtype=BF16, device=DEVICE)
    dk.decode_attention(wide[:, 1], k, v, tables, lens, 0.125, out[:, 0], splits=2)
    want = ops.decode_attention(q, k, v, tables, lens, 0.125, torch.empty_like(q))
    torch.testing.assert_close(out[:, 0].float(), want.float(), atol=2e-2, rtol=2e-2)
    assert out[:, 1].abs().sum() == 0


def test_split_count_depends_only_on_the_power_of_two_batch():
    cpu = torch.device("cpu")
    assert dk.num_splits(5, 8, cpu) == dk.num_splits(8, 8, cpu) == dk.num_splits(7, 8, cpu)
    assert dk.num_splits(1, 8, cpu) == dk.MAX_SPLITS
    assert dk.num_splits(256, 8, cpu) == 1


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_its_twin(residual):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((5, 96), generator=gen).to(BF16).to(DEVICE)
    r = torch.randn((5, 96), generator=gen).to(BF16).to(DEVICE) if residual else None
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(BF16).to(DEVICE)
    want, want_sum = ops.rms_norm(x, w, 1e-5, r)
    got, got_sum = elementwise.rms_norm(x, w, 1e-5, r)
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1e-2)
    if residual:  # within one rounding step (the interpreter's bf16 rounding is not the GPU's)
        torch.testing.assert_close(got_sum.float(), want_sum.float(), atol=0, rtol=2 ** -7)
    else:
        assert got_sum is None and want_sum is None


def test_silu_and_mul_matches_its_twin():
    x = torch.randn((3, 2 * 1500), generator=torch.Generator().manual_seed(2)).to(BF16).to(DEVICE)
    torch.testing.assert_close(elementwise.silu_and_mul(x).float(), ops.silu_and_mul(x).float(),
                               atol=1e-2, rtol=1e-2)


def test_rope_rotates_strided_views_in_place_like_its_twin():
    from neo_gpu_worker.rope import RotaryEmbedding

    rope = RotaryEmbedding(64, 128, 10000.0, None, DEVICE)
    qkv = torch.randn((4, (9 + 2 * 3) * 64), generator=torch.Generator().manual_seed(3)).to(BF16).to(DEVICE)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k = q.view(4, 9, 64), k.view(4, 3, 64)
    pos = torch.tensor([0, 5, 77, 127], device=DEVICE)
    want_q, want_k = ops.rope(pos, q, k, rope.cos, rope.sin)
    got_q = elementwise.rope_(q, pos, rope.cos, rope.sin)
    got_k = elementwise.rope_(k, pos, rope.cos, rope.sin)
    assert got_q.data_ptr() == q.data_ptr()
    torch.testing.assert_close(got_q.float(), want_q.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_k.float(), want_k.float(), atol=1e-2, rtol=1e-2)


def test_rope_with_the_kv_store_matches_rope_then_write_kv():
    """The decode path's fused kernel: q and k rotated in place, k and v in their slots, nothing else
    of the cache touched (the slots are shuffled and include a padding row's scratch slot)."""
    from neo_gpu_worker.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(4)
    rope = RotaryEmbedding(64, 128, 10000.0, None, DEVICE)
    qkv = torch.randn((5, (9 + 2 * 3) * 64), generator=g).to(BF16).to(DEVICE)
    kv_layer = torch.randn((2, 6, 16, 3, 64), generator=g).to(BF16).to(DEVICE)   # [2, blocks, bs, Hkv, D]
    pos = torch.tensor([0, 5, 77, 127, 0], device=DEVICE)
    slots = torch.tensor([33, 2, 90, 17, 95], device=DEVICE)

    def split(t):
        q, k, v = t.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
        return q.view(5, 9, 64), k.view(5, 3, 64), v.reshape(5, 3, 64)

    q, k, v = split(qkv.clone())
    want_q, want_k = ops.rope(pos, q, k, rope.cos, rope.sin)
    want_cache = kv_layer.clone()
    ops.write_kv(want_cache, slots, want_k, v)
    q, k, v = split(qkv.clone())
    cache = kv_layer.clone()
    got_q, got_k = elementwise.rope_and_store_(q, k, v, pos, rope.cos, rope.sin, cache, slots)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(got_q.float(), want_q.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_k.float(), want_k.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cache.float(), want_cache.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen runs on CUDA only")
def test_packed_varlen_prefill_matches_the_per_span_twin():
    """Spans of one iteration: fresh prompts and a later chunk that sees its earlier context."""
    from neo_gpu_worker.attention import PackedPrefill, PrefillSpan

    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim = 8, 2, 128
    k = torch.randn((600, kv_heads, dim), generator=gen).to(BF16).to(DEVICE)
    v = torch.randn((600, kv_heads, dim), generator=gen).to(BF16).to(DEVICE)
    # (token_start, num_tokens, ctx_start); contexts are disjoint slot ranges of the pool
    shape = [(0, 100, 0), (100, 37, 200), (137, 5, 0), (142, 64, 60)]
    spans, first = [], 0
    for start, n, ctx in shape:
        spans.append(PrefillSpan(start, n, ctx, torch.arange(first, first + ctx + n, device=DEVICE)))
        first += ctx + n
    q = torch.randn((206, heads, dim), generator=gen).to(BF16).to(DEVICE)
    packed = PackedPrefill.of(spans)
    got = ops.varlen_prefill(q[packed.token_idx], k[packed.ctx_slots], v[packed.ctx_slots], packed.cu_q,
                             packed.cu_k, packed.max_q, packed.max_k, dim ** -0.5)
    want = torch.cat([ops.prefill_attention(q[s.token_start:s.token_start + s.num_tokens], k[s.ctx_slots],
                                            v[s.ctx_slots], s.ctx_start, dim ** -0.5) for s in spans])
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
