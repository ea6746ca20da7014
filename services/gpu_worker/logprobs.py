"""Logprobs on the device, as vLLM's default ``raw_logprobs``: ``log_softmax`` of the model's own
logits, before logit bias, penalties, temperature or any filter changes them.

Only the rows that ask pay: their logits are taken out (a copy, before the sampler may touch the
batch's logits) and reduced to the chosen token's logprob and rank and the top ``k`` ids and
logprobs. Every size is known on the host (rows, ``k``), nothing is read back while the iteration
runs: the results travel to the host with the sampled tokens, in the same non-blocking copy.
Each row is reduced on its own, so a row's numbers do not depend on its batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from neo_common.protocol import IterationPlan, IterationResult
from neo_gpu_worker.batch import to_device

# prompt positions reduced at once: a whole long prompt's logits ([tokens, vocab] float32) at once
# would take gigabytes; pieces of this many bound it (their count is known on the host)
_PIECE = 512


@dataclasses.dataclass
class TokenLogprobs:
    """Per token: the chosen token's ``logprob`` and ``rank`` (1 = likeliest), the ``top_ids`` /
    ``top_values`` of the likeliest ``k`` in descending order. Device tensors, or host arrays
    after :meth:`to_host` and :meth:`numpy`."""

    logprob: torch.Tensor
    rank: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    def to_host(self) -> "TokenLogprobs":
        """Queue the copies to the host (pinned memory on CUDA); read them after the iteration ends."""
        return TokenLogprobs(*(t.to("cpu", non_blocking=True) for t in dataclasses.astuple(self)))

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (self.logprob.numpy(), self.rank.numpy().astype(np.int32), self.top_ids.numpy().astype(np.int32),
                self.top_values.numpy())

    @classmethod
    def cat(cls, parts: list["TokenLogprobs"]) -> "TokenLogprobs":
        return cls(*(torch.cat(cols) for cols in zip(*(dataclasses.astuple(p) for p in parts))))


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Raw logprobs of ``logits [N, V]`` (float32 whatever the model's dtype)."""
    return torch.log_softmax(logits.float(), dim=-1)


def reduce(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> TokenLogprobs:
    """``logprobs [N, V]``, ``chosen [N]`` token ids -> the chosen tokens' logprobs and ranks and the
    top ``k`` (``k`` = 0: none). The rank counts the tokens strictly likelier, as vLLM's."""
    mine = logprobs.gather(1, chosen.view(-1, 1).to(torch.int64)).squeeze(1)
    rank = (logprobs > mine.unsqueeze(1)).sum(dim=-1).to(torch.int32) + 1
    if k:
        values, ids = logprobs.topk(k, dim=-1, sorted=True)
    else:
        values = logprobs.new_zeros((len(mine), 0))
        ids = torch.zeros((len(mine), 0), dtype=torch.int64, device=logprobs.device)
    return TokenLogprobs(mine, rank, ids.to(torch.int32), values)


class SampledLogprobs:
    """The sampled rows that asked for logprobs (``plan.logprobs`` >= 0), picked out of an
    iteration's logits before sampling (``rows``: indices into the sampled rows, ``k``: the most
    any of them asked)."""

    def __init__(self, plan: IterationPlan, sample_rows: np.ndarray, logits: torch.Tensor) -> None:
        counts = plan.logprobs[sample_rows].astype(np.int64) if len(plan.logprobs) else np.zeros(0, np.int64)
        self.rows = np.flatnonzero(counts >= 0)
        self.k = int(counts[self.rows].max()) if len(self.rows) else 0
        self.seq_ids = plan.seq_ids[sample_rows][self.rows]
        self._rows_on = to_device(logits.device)(self.rows) if len(self.rows) else None
        # a copy: the sampler may change the batch's logits (and they are not raw after that)
        self.logprobs = log_softmax(logits[self._rows_on]) if len(self.rows) else None

    def __bool__(self) -> bool:
        return bool(len(self.rows))

    def of(self, sampled: torch.Tensor) -> TokenLogprobs:
        """Reduce once the tokens are sampled (device tensor of every sampled row)."""
        return reduce(self.logprobs, sampled[self._rows_on], self.k)


def prompt_logprobs(plan: IterationPlan, hidden_at, compute_logits) -> TokenLogprobs | None:
    """The plan's prompt logprobs: for row ``plp_rows[j]``, positions ``plp_first[j] ..`` (count
    ``plp_count[j]``) of its chunk predicting ``plp_targets``. ``hidden_at(rows, first, count)`` gives
    the final hidden states of those positions, flat in that order; ``compute_logits`` the LM head."""
    if not len(plan.plp_rows):
        return None
    hidden = hidden_at(plan.plp_rows.astype(np.int64), plan.plp_first.astype(np.int64),
                       plan.plp_count.astype(np.int64))
    dev = to_device(hidden.device)
    targets = dev(plan.plp_targets.astype(np.int64))
    k = int(plan.plp_k.max())
    parts = [reduce(log_softmax(compute_logits(hidden[s:s + _PIECE])), targets[s:s + _PIECE], k)
             for s in range(0, len(plan.plp_targets), _PIECE)]
    return TokenLogprobs.cat(parts)


def flat_positions(offsets: np.ndarray, rows: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Flat token indices of ``count`` positions from ``first`` of each row, whose chunk starts at
    ``offsets[row]`` in the flat batch; concatenated in row order."""
    starts = np.repeat(offsets[rows] + first - np.cumsum(count) + count, count)
    return starts + np.arange(int(count.sum()))


def fill_result(result: IterationResult, sampled: tuple[np.ndarray, TokenLogprobs] | None,
                prompt: tuple[IterationPlan, TokenLogprobs] | None) -> None:
    """Write the host copies (the iteration has ended) into the result's logprob columns."""
    if sampled is not None:
        result.lp_seq_ids = sampled[0]
        result.lp_logprob, result.lp_rank, result.lp_top_ids, result.lp_top_values = sampled[1].numpy()
    if prompt is not None:
        plan, values = prompt
        result.plp_seq_ids = plan.seq_ids[plan.plp_rows.astype(np.int64)]
        result.plp_count = plan.plp_count.astype(np.int32)
        result.plp_logprob, result.plp_rank, result.plp_top_ids, result.plp_top_values = values.numpy()
