import numpy as np
import torch

from neo_gpu_worker.sampler import SamplingBatch, sample


def batch(temps, top_p=None, top_k=None, seeds=None, steps=None, vocab=50):
    n = len(temps)
    return SamplingBatch.from_columns(
        np.array(temps, np.float32), np.array(top_p or [1.0] * n, np.float32), np.array(top_k or [-1] * n, np.int32),
        np.array(seeds or [-1] * n, np.int64), np.array(steps or [0] * n, np.int32), vocab, torch.device("cpu"))


def test_greedy_rows_take_argmax_and_random_rows_follow_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    logits[1] = -1e9
    logits[1, [3, 7]] = torch.tensor([0.0, float(np.log(3.0))])  # p(3)=0.25, p(7)=0.75
    gen = torch.Generator().manual_seed(1)
    draws = [sample(logits, batch([0.0, 1.0]), gen).tolist() for _ in range(2000)]
    assert all(d[0] == int(logits[0].argmax()) for d in draws)
    share7 = np.mean([d[1] == 7 for d in draws])
    assert 0.71 < share7 < 0.79 and all(d[1] in (3, 7) for d in draws)


def test_top_k_and_top_p_filter_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 46] * 2))
    gen = torch.Generator().manual_seed(2)
    seen_k, seen_p = set(), set()
    for _ in range(500):
        out = sample(logits, batch([1.0, 1.0], top_p=[1.0, 0.75], top_k=[2, -1]), gen).tolist()
        seen_k.add(out[0])
        seen_p.add(out[1])
    assert seen_k == {0, 1}, "top_k=2 keeps the two most likely tokens"
    assert seen_p == {0, 1}, "top_p=0.75 keeps the smallest prefix reaching 0.75 (0.5 + 0.3)"


def test_seeded_rows_are_reproducible_regardless_of_batch():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    a = sample(logits, batch([1.0, 1.0, 1.0], seeds=[11, 12, 13], steps=[0, 0, 5]))
    b = sample(logits[2:], batch([1.0], seeds=[13], steps=[5]))
    c = sample(logits[2:], batch([1.0], seeds=[13], steps=[6]))
    assert a[2] == b[0]
    draws = {int(sample(logits[2:], batch([1.0], seeds=[13], steps=[s]))[0]) for s in range(30)}
    assert len(draws) > 1 and c.shape == (1,), "different steps draw different noise"
