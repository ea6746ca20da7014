"""The CPU device's dense matmul over GGUF blocks (``quant_dense``, the native ``_quant_dense``).

Against a float64 reference over the loader's own dequantization (``dequant.dequantize``) for each
block format and odd shapes; bit-identical rows whatever the batch holds (batch-invariance, which
the offload/pipeline equivalence relies on), whatever the thread count, and between the AVX2 and
the portable scalar build. Tolerance: the kernel sums each output in 8 lanes of K/8 fused
multiply-adds, then 3 additions, so with u = 2^-24 its error is at most (K/8 + 3) * u * sum|w * x|
(first order); the test allows twice that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo_gpu_worker import quant_dense as qd
from neo_gpu_worker.dequant import dequantize

pytestmark = pytest.mark.skipif(not qd.available(), reason="neo_gpu_worker._quant_dense is not built")

FORMATS = list(qd.BlockFormat)
ISAS = [qd.Isa.GENERIC] + ([qd.Isa.AVX2] if qd.isa_name() == "avx2" else [])


def random_blocks(fmt: qd.BlockFormat, n: int, k: int, seed: int) -> np.ndarray:
    """Raw GGUF bytes ``[n, k / 32 * block_bytes]``: random quants, scales (and Q4_1 minimums) of a
    real model's magnitude, a few subnormal and zero scales among them."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // qd.QK, fmt.block_bytes), dtype=np.uint8)
    d = (rng.standard_normal((n, k // qd.QK)) * 0.01).astype(np.float16)
    d.flat[3::7] = np.float16(3e-6)   # subnormal in float16
    d.flat[5::11] = 0
    raw[:, :, 0:2] = d.view(np.uint8).reshape(n, k // qd.QK, 2)
    if fmt == qd.BlockFormat.Q4_1:
        m = (rng.standard_normal((n, k // qd.QK)) * 0.05).astype(np.float16)
        raw[:, :, 2:4] = m.view(np.uint8).reshape(n, k // qd.QK, 2)
    return raw.reshape(n, -1)


def make(fmt: qd.BlockFormat, n: int, k: int, seed: int = 0) -> tuple[qd.QuantBlocks, torch.Tensor]:
    raw = random_blocks(fmt, n, k, seed)
    return qd.QuantBlocks.from_gguf(raw, int(fmt), (n, k)), torch.from_numpy(dequantize(raw, int(fmt), (n, k)))


def check_close(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    ref = x.double() @ w.double().T
    bound = (x.double().abs() @ w.double().abs().T) * 2 * (w.shape[1] / 8 + 3) * 2.0 ** -24
    if bias is not None:
        ref = ref + bias.double()
        bound = bound + bias.double().abs() * 2.0 ** -23   # the bias add's rounding
    err = (y.double() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), f"max error {err.max():.3g}, max allowed {bound.max():.3g}"


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: i.name)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (37, 96), (130, 576), (9, 1056)])
def test_matches_the_float64_reference_of_the_dequantized_weight(fmt, isa, n, k):
    qb, w = make(fmt, n, k, seed=n * k)
    gen = torch.Generator().manual_seed(n + k)
    for m in list(range(1, 18)) + [33, 70]:   # 70: two passes of the 64-row schedule
        x = torch.randn(m, k, generator=gen)
        check_close(qb.matmul(x, isa=isa), w, x)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(5, k, generator=gen)
    check_close(qb.matmul(x, bias, isa=isa), w, x, bias)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_a_row_gets_the_same_bits_alone_in_any_batch_on_any_thread_count_and_isa(fmt):
    n, k = 203, 1088   # N not a multiple of the tile, K not of the 512-value chunk
    qb, _ = make(fmt, n, k, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(80, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    whole = qb.matmul(x, bias, threads=1)
    for isa in ISAS:
        for threads in (1, 2, 3):
            assert torch.equal(qb.matmul(x, bias, isa=isa, threads=threads), whole), f"{isa.name} {threads} threads"
    for rows in (1, 2, 3, 4, 5, 8, 13, 17, 33, 64, 65):
        for first in (0, 80 - rows, (80 - rows) // 2):
            got = qb.matmul(x[first:first + rows], bias, threads=2)
            assert torch.equal(got, whole[first:first + rows]), f"{rows} rows from {first}"
    # other rows' contents do not matter either (NaN and huge values beside a row)
    noisy = torch.randn(9, k, generator=gen) * 1e30
    noisy[3, 5] = float("nan")
    noisy[4] = x[17]
    assert torch.equal(qb.matmul(noisy, bias)[4], whole[17])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_lookup_gives_the_dequantized_rows(fmt):
    qb, w = make(fmt, 50, 128, seed=3)
    ids = torch.tensor([[3, 0], [49, 3]])
    assert torch.equal(qb.lookup(ids), w[ids])
    with pytest.raises(IndexError):
        qb.lookup(torch.tensor([50]))


def test_blocks_narrow_and_stack_like_the_rows_and_columns_they_hold():
    qb, w = make(qd.BlockFormat.Q4_1, 24, 128, seed=4)
    x = torch.randn(3, 64)
    cols = qb.narrow(1, 32, 64)
    assert torch.equal(qb.narrow(1, 32, 64).matmul(x), make_dense(cols).matmul(x))
    check_close(cols.matmul(x), w[:, 32:96], x)
    assert qb.narrow(1, 16, 64) is None   # not on a block boundary
    parts = [(10, qb.narrow(0, 10, 14)), (0, qb.narrow(0, 0, 10))]
    assert torch.equal(qd.QuantBlocks.cat(parts, 24).data, qb.data)
    assert qd.QuantBlocks.cat(parts[:1], 24) is None


def make_dense(qb: qd.QuantBlocks) -> qd.QuantBlocks:
    """The same blocks in a fresh contiguous tensor (a narrowed view must compute the same)."""
    return qd.QuantBlocks(qb.fmt, qb.data.clone())


def test_one_row_reads_the_blocks_once_and_eight_rows_cost_far_less_than_eight():
    """Decode is bound by weight bytes: one row streams the blocks, and a batch of eight reuses each
    dequantized tile, so it costs much less than eight single rows (thread CPU time, one thread)."""
    import time

    qb, _ = make(qd.BlockFormat.Q4_1, 3072, 1536, seed=5)
    one, eight = torch.randn(1, 1536), torch.randn(8, 1536)

    def cpu_ms(x) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for _ in range(5):
                qb.matmul(x, threads=1)
            best = min(best, time.thread_time() - t)
        return best * 1e3

    t1, t8 = cpu_ms(one), cpu_ms(eight)
    assert t8 < 5 * t1, f"8 rows {t8:.2f} ms vs 1 row {t1:.2f} ms"


@pytest.fixture(scope="module")
def smollm2_pair():
    """The embedded model loaded twice on the CPU device: over its GGUF blocks, and dequantized."""
    from neo_common.config import ModelConfig
    from neo_common.model_source import resolve
    from neo_gpu_worker.loader import load_model

    source, cpu = resolve(ModelConfig()), torch.device("cpu")
    return (load_model(source, 256, cpu, torch.float32),
            load_model(source, 256, cpu, torch.float32, gguf_blocks=False))


def test_the_embedded_model_runs_its_dense_layers_and_head_on_the_blocks(smollm2_pair):
    from neo_gpu_worker.fp8 import weight_bytes

    quant, f32 = smollm2_pair
    for layer in quant.layers:
        for dense_layer in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                            layer.mlp.down_proj):
            assert isinstance(dense_layer, qd.QuantLinear) and dense_layer.blocks.fmt == qd.BlockFormat.Q4_1
    assert quant.tied_head.blocks.fmt == qd.BlockFormat.Q8_0 and f32.tied_head is None
    assert isinstance(quant.embed_tokens, qd.QuantEmbedding) and quant.embed_tokens.blocks is quant.tied_head.blocks
    ids = torch.tensor([0, 17, 49151, 17])
    assert torch.equal(quant.embed(ids), f32.embed(ids))   # the same float32 values as the dequantized table
    assert not isinstance(f32.layers[0].mlp.down_proj, qd.QuantLinear)
    assert weight_bytes(quant) < 0.25 * weight_bytes(f32)
    # the same hidden states in: the head's logits within the kernel's bound of the float32 head's
    hidden = torch.randn(3, quant.geometry.hidden_size)
    check_close(quant.compute_logits(hidden), f32.embed_tokens.weight, hidden)
    x = torch.randn(2, 576)
    check_close(quant.layers[3].mlp.gate_up_proj(x), f32.layers[3].mlp.gate_up_proj.weight, x)
    # q/k rows were un-permuted with their blocks (llama.cpp's RoPE order) and q/k/v fused in order
    check_close(quant.layers[5].self_attn.qkv_proj(x), f32.layers[5].self_attn.qkv_proj.weight, x)


def test_without_the_native_module_the_model_loads_dequantized_with_one_log_line(monkeypatch, caplog):
    from neo_common.config import ModelConfig
    from neo_common.model_source import resolve
    from neo_gpu_worker.loader import load_model

    monkeypatch.setattr(qd, "_native", None)
    with caplog.at_level("INFO", logger="neo_gpu_worker.loader"):
        model = load_model(resolve(ModelConfig()), 64, torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, qd.QuantLinear) for m in model.modules())
    assert sum("_quant_dense is not built" in r.getMessage() for r in caplog.records) == 1
    hidden = torch.randn(2, model.geometry.hidden_size)
    assert model.compute_logits(hidden).shape == (2, model.geometry.vocab_size)


def test_blocks_in_any_other_layout_are_refused_before_the_kernel_reads_them():
    qb, _ = make(qd.BlockFormat.Q8_0, 8, 64)
    for bad in (qb.data.to(torch.int8), qb.data.reshape(8, -1), qb.data[:, :, :20], qb.data.transpose(0, 1)):
        with pytest.raises(ValueError, match="Q8_0 blocks must be contiguous uint8"):
            qd.QuantBlocks(qd.BlockFormat.Q8_0, bad)
    with pytest.raises(ValueError, match="Q4_1 blocks"):   # Q8_0's 34-byte blocks read as Q4_1's 20
        qd.QuantBlocks(qd.BlockFormat.Q4_1, qb.data)
