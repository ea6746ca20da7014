"""The CPU device's dense matmul: batch-invariant (a row's result does not depend on the rows beside
it), and a single row costs a matrix-vector product, not a padded batch's matmul."""

from __future__ import annotations

import time

import pytest
import torch

from neo_gpu_worker import dense as dense_mod
from neo_gpu_worker.dense import dense

# SmolLM2-135M's dense shapes (in, out): fused qkv, o, fused gate/up, down, and a slice of the LM head
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 8192)]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("k,n", SHAPES)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(k, n):
    gen = torch.Generator().manual_seed(k + n)
    weight = torch.nn.Parameter(torch.randn(n, k, generator=gen) * 0.02, requires_grad=False)
    bias = torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False)
    x = torch.randn(300, k, generator=gen)
    with torch.inference_mode():
        whole = dense(x, weight, bias)
        for rows in (1, 2, 3, 5, 8, 13, 16, 17, 40, 129):
            for first in (0, 300 - rows):
                got = dense(x[first:first + rows], weight, bias)
                assert torch.equal(got, whole[first:first + rows]), f"{rows} rows from {first}"
    ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double()).float()
    assert torch.allclose(whole, ref, atol=1e-4)


def test_a_written_parameter_is_packed_again():
    """The packed copy follows the parameter: a load writing it in place, or a new tensor, is seen."""
    weight = torch.nn.Parameter(torch.zeros(64, 32), requires_grad=False)
    x = torch.ones(1, 32)
    assert torch.equal(dense(x, weight), torch.zeros(1, 64))
    with torch.no_grad():
        weight.copy_(torch.ones(64, 32))
    assert torch.equal(dense(x, weight), torch.full((1, 64), 32.0))
    weight.data = torch.full((64, 32), 2.0)
    assert torch.equal(dense(x, weight), torch.full((1, 64), 64.0))


def test_a_temporary_weight_is_not_kept():
    w = torch.randn(64, 32)
    x = torch.randn(3, 32)
    assert torch.allclose(dense(x, w), x @ w.T, atol=1e-5)
    assert not hasattr(w, "_neo_packed")


def _cpu_ms(fn, reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e3


@pytest.mark.skipif(not dense_mod._ONEDNN, reason="this torch has no oneDNN packed linear")
def test_one_row_costs_less_than_sixteen(one_thread):
    """A decode row alone must not pay for a 16-row batch (padding to 16 rows made them cost the
    same: MKL's kernels agree only from 16 rows on). Weights larger than the caches, one thread;
    thread CPU time, so other processes' load does not count."""
    weights = [torch.nn.Parameter(torch.randn(3072, 1536) * 0.02, requires_grad=False) for _ in range(8)]
    one, sixteen = torch.randn(1, 1536), torch.randn(16, 1536)
    with torch.inference_mode():
        run = lambda x: [dense(x, w) for w in weights]  # noqa: E731
        run(one), run(sixteen)   # packs the weights
        t1, t16 = _cpu_ms(lambda: run(one)), _cpu_ms(lambda: run(sixteen))
    assert t16 > 1.5 * t1, f"1 row {t1:.2f} ms, 16 rows {t16:.2f} ms"
