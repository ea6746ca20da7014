"""The native kernel against the torch reference on random inputs (scattered blocks, odd lengths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo_common.host_kernel import _native, kernel
from neo_common.host_kernel.reference import reference_attend

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NAN_BITS = {"bfloat16": 0x7FC1, "float16": 0x7E01}
RTOL = {"bfloat16": 2.0**-7, "float16": 2.0**-9}   # output rounding dominates (8 / 11 bit mantissas)
HEADS = [(8, 8), (9, 3), (32, 8), (16, 2)]         # query/KV head ratios 1, 3, 4, 8
BLOCK = 16


def available_isas() -> list[str]:
    best = kernel.isa()
    order = ["avx512", "avx2", "vec16", "generic"]
    return order[order.index(best):]


@pytest.fixture(autouse=True)
def _restore_pool():
    threads, isa = kernel.get_num_threads(), kernel.isa()
    yield
    _native.set_num_threads(threads)
    _native.force_isa(isa)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def from_bits(a: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16).copy()).view(TORCH_DTYPES[dtype]).float()


def make_case(rng: np.random.Generator, lens: list[int], hq: int, hkv: int, d: int, dtype: str, spare: int = 7):
    """A pool poisoned with NaN everywhere except valid tokens; blocks of each request scattered."""
    tdt = TORCH_DTYPES[dtype]
    batch = len(lens)
    nbs = [(n + BLOCK - 1) // BLOCK for n in lens]
    num_blocks = sum(nbs) + spare
    max_blocks = max(nbs) + 2
    perm = rng.permutation(num_blocks).astype(np.int32)
    bt = np.full((batch, max_blocks), -1, np.int32)
    off = 0
    for b, nb in enumerate(nbs):
        bt[b, :nb] = perm[off:off + nb]
        off += nb
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    k_cache = torch.full((num_blocks, hkv, BLOCK, d), float("nan"), dtype=tdt)
    v_cache = torch.full((num_blocks, hkv, BLOCK, d), float("nan"), dtype=tdt)
    for b, n in enumerate(lens):  # fill tokens 0..n-2; token n-1 arrives as k_new/v_new
        for j in range(nbs[b]):
            valid = min(BLOCK, n - 1 - j * BLOCK)
            if valid > 0:
                k_cache[bt[b, j], :, :valid] = torch.randn(hkv, valid, d, generator=gen).to(tdt)
                v_cache[bt[b, j], :, :valid] = torch.randn(hkv, valid, d, generator=gen).to(tdt)
    q = (torch.randn(batch, hq, d, generator=gen) * 2).to(tdt)   # *2: peakier softmax
    k_new = torch.randn(batch, hkv, d, generator=gen).to(tdt)
    v_new = torch.randn(batch, hkv, d, generator=gen).to(tdt)
    return q, k_cache, v_cache, bt, np.asarray(lens, np.int32), k_new, v_new


def run_and_compare(rng, lens, hq, hkv, d, dtype):
    q, kc, vc, bt, sl, kn, vn = make_case(rng, lens, hq, hkv, d, dtype)
    kc_np, vc_np = bits(kc.clone()), bits(vc.clone())
    out = np.full((len(lens), hq, d), NAN_BITS[dtype], np.uint16)
    kernel.attend(bits(q), kc_np, vc_np, bt, sl, k_new=bits(kn), v_new=bits(vn), out=out, dtype=dtype)
    ref = reference_attend(q, kc, vc, torch.from_numpy(bt), torch.from_numpy(sl), kn, vn)
    got = from_bits(out, dtype)
    assert not torch.isnan(got).any(), "an output element was not written"
    tol = RTOL[dtype] * ref.abs() + RTOL[dtype] * 0.05 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; max err {(got - ref).abs().max():.3g}"
    # the appended token landed where the reference put it (poisoned tails stay poisoned)
    np.testing.assert_array_equal(kc_np, bits(kc))
    np.testing.assert_array_equal(vc_np, bits(vc))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_matches_reference(heads, d, dtype):
    hq, hkv = heads
    rng = np.random.default_rng(hq * 1000 + d + (dtype == "float16"))
    # many short requests (batch up to 64) and a few long ones around block boundaries up to 4100
    batch = int(rng.integers(24, 65))
    short = [int(x) for x in rng.integers(1, 300, batch)]
    short[:4] = [1, 15, 16, 17]
    run_and_compare(rng, short, hq, hkv, d, dtype)
    run_and_compare(rng, [4100, int(rng.integers(1000, 4100)), 2049], hq, hkv, d, dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_split_merge(threads):
    _native.set_num_threads(threads)
    rng = np.random.default_rng(threads)
    for hq, hkv in [(9, 3), (32, 8)]:
        run_and_compare(rng, [1, 4100, 700, 33], hq, hkv, 64, "bfloat16")


@pytest.mark.parametrize("isa", available_isas())
def test_every_isa_of_this_cpu(isa):
    assert _native.force_isa(isa) == 0
    assert kernel.isa() == isa
    rng = np.random.default_rng(7)
    for dtype in ("bfloat16", "float16"):
        run_and_compare(rng, [1, 16, 17, 260], 9, 3, 64, dtype)
        run_and_compare(rng, [300, 5], 32, 8, 128, dtype)


def test_batch_one_and_no_append():
    rng = np.random.default_rng(3)
    q, kc, vc, bt, sl, kn, vn = make_case(rng, [37], 16, 2, 128, "bfloat16")
    kc[bt[0, 2], :, 4] = kn[0]       # place the new token ourselves
    vc[bt[0, 2], :, 4] = vn[0]
    out = kernel.attend(bits(q), bits(kc), bits(vc), bt, sl, dtype="bfloat16")
    ref = reference_attend(q, kc, vc, torch.from_numpy(bt), torch.from_numpy(sl))
    torch.testing.assert_close(from_bits(out, "bfloat16"), ref, rtol=2**-7, atol=1e-2)


def test_empty_batch_is_a_no_op():
    kc = np.zeros((4, 2, BLOCK, 64), np.uint16)
    out = kernel.attend(np.zeros((0, 4, 64), np.uint16), kc, kc.copy(), np.zeros((0, 1), np.int32),
                        np.zeros(0, np.int32))
    assert out.shape == (0, 4, 64)


def test_bad_inputs_are_refused():
    kc = np.zeros((4, 2, BLOCK, 64), np.uint16)
    q = np.zeros((1, 4, 64), np.uint16)
    with pytest.raises(kernel.KernelError, match="block id"):
        kernel.attend(q, kc, kc.copy(), np.array([[4]], np.int32), np.array([3], np.int32))
    with pytest.raises(kernel.KernelError, match="sequence length"):
        kernel.attend(q, kc, kc.copy(), np.array([[0]], np.int32), np.array([0], np.int32))
    with pytest.raises(kernel.KernelError, match="sequence length"):
        kernel.attend(q, kc, kc.copy(), np.array([[0]], np.int32), np.array([17], np.int32))
    with pytest.raises(kernel.KernelError, match="invalid"):
        kernel.attend(np.zeros((1, 3, 64), np.uint16), kc, kc.copy(), np.array([[0]], np.int32),
                      np.array([3], np.int32))
    with pytest.raises(ValueError, match="shape"):
        kernel.attend(q, kc, kc.copy(), np.array([[0]], np.int32), np.array([3], np.int32),
                      out=np.zeros((1, 4, 32), np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        kernel.attend(q, kc, kc.copy(), np.array([[0]], np.int32), np.array([3], np.int32), dtype="fp8")
