"""An iteration between its launch and its result: queued on the device, waiting for its tokens.

The worker launches a plan and returns at once, so the next plan is queued behind it; these are the
handles it keeps meanwhile (``ModelRunner.launch``). ``done`` says whether ``finish`` would return
at once; ``awaits_mask`` whether the plan's sampling still waits for its grammar masks
(``IterationPlan.bitmask_deferred``).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from neo_common.protocol import IterationPlan, IterationResult
from neo_gpu_worker.logprobs import fill_result


class Timer:
    """Start, end-of-swaps (``copied``: only when the plan swaps), end-of-forward and end marks of
    one iteration: CUDA events on a GPU (the device's own time, so an iteration queued behind
    another counts from when the GPU reached it), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks = [self._now()]
        self.copied = False

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def mark_copied(self) -> None:
        """The plan's swaps are queued (the mark before the forward's)."""
        self.copied = True
        self.mark()

    def done(self) -> bool:
        return not self.cuda or self.marks[-1].query()

    def wait(self) -> None:
        if self.cuda:
            self.marks[-1].synchronize()

    def seconds(self) -> list[float]:
        """Seconds from the start to each later mark (after :meth:`wait`)."""
        first = self.marks[0]
        if self.cuda:
            return [first.elapsed_time(m) / 1e3 for m in self.marks[1:]]
        return [m - first for m in self.marks[1:]]


class Launched:
    """An iteration whose work is queued: its result lacks the tokens and the times until
    :meth:`finish`, which waits for the tokens' copy to the host.

    - ``result``: filled by ``ModelRunner.launch`` except ``token_ids`` and the times.
    - ``tokens``: the sampled tokens' host copy, in flight (None: nothing sampled on this rank).
    - ``logprobs``: the host copies of the sampled tokens' logprobs (seq ids, values) and of the
      prompt logprobs (plan, values), in flight like the tokens (None: no row asked).
    - ``timer``: marks the start and the end of the forward; the end of the iteration is marked here.
    """

    awaits_mask = False

    def __init__(self, result: IterationResult, timer: Timer, tokens: torch.Tensor | None = None,
                 logprobs: tuple | None = None) -> None:
        self.result, self.timer, self.tokens = result, timer, tokens
        self.logprobs = logprobs
        timer.mark()

    def done(self) -> bool:
        """Whether :meth:`finish` would return at once."""
        return self.timer.done()

    def finish(self) -> IterationResult:
        self.timer.wait()
        result = self.result
        if self.tokens is not None:
            result.token_ids = self.tokens.numpy()
        if self.logprobs is not None:
            fill_result(result, *self.logprobs)
        times = self.timer.seconds()
        if self.timer.copied:
            result.swap_s = times.pop(0)
        result.forward_s, result.total_s = times
        result.sample_s = result.total_s - result.forward_s
        return result


@dataclasses.dataclass
class Forwarded:
    """An iteration whose forward is queued and whose sampling is not: what ``ModelRunner._sample``
    needs (the plan, its result so far, its timer, the placeholder fill, the sampled rows, their
    last hidden states and the positions' accessor for prompt logprobs)."""

    plan: IterationPlan
    result: IterationResult
    timer: Timer
    fill: tuple | None
    sample_rows: np.ndarray
    last: torch.Tensor
    hidden_at: object
    logits: torch.Tensor | None = None   # queued already (a plan whose masks follow), else None


class AwaitingMask:
    """A plan sent with ``bitmask_deferred``: its forward is queued, its sampling waits for the
    ``GrammarBitmask`` the gateway sends once the previous plan's tokens advanced the grammars.
    The device runs the forward meanwhile, so the masks cost no gap unless they come later than it
    ends. ``launched``: the sampling, once queued (None until then); ``error``: why the plan fails
    although it sampled (masks that never came or could not be used).

    A plan that fails here still samples, unmasked: tensor-parallel followers sample nothing but
    wait in the broadcast of rank 0's tokens, and a rank that skipped it would pair its next
    collective with theirs. The gateway discards those tokens with the failed plan."""

    def __init__(self, iteration_id: int,
                 sample: Callable[[tuple[np.ndarray, np.ndarray] | None], Launched]) -> None:
        self.iteration_id, self.sample = iteration_id, sample
        self.launched: Launched | None = None
        self.error: Exception | None = None

    @property
    def awaits_mask(self) -> bool:
        return self.launched is None

    def supply(self, masks: tuple[np.ndarray, np.ndarray]) -> "AwaitingMask":
        """Queue the sampling under ``masks``: the ``GrammarBitmask``'s (distinct masks, index)."""
        try:
            self.launched = self.sample(masks)
        except Exception as exc:   # masks that do not fit the plan
            self.error = exc
            self.launched = self.sample(None)
        return self

    def abandon(self) -> "AwaitingMask":
        """The masks will not come (the plan is being answered without them): sample unmasked and fail."""
        if self.launched is None:
            self.error = ValueError(f"iteration {self.iteration_id}: its grammar masks never came")
            self.launched = self.sample(None)
        return self

    def done(self) -> bool:
        return self.launched is not None and self.launched.done()

    def finish(self) -> IterationResult:
        result = self.abandon().launched.finish()
        if self.error is not None:
            raise self.error
        return result


class OnCpuThread:
    """A launch running on the runner's CPU thread: the CPU device's stand-in for a CUDA stream
    (plans run in order, behind the caller's back), so the worker's loop overlaps its IPC with
    the forward there too, and CI runs the same launch-ahead path as a GPU. A deferred mask's
    sampling is queued on the same thread behind the forward (``awaits_mask`` until then)."""

    def __init__(self, stream: ThreadPoolExecutor, future: Future, awaits_mask: bool) -> None:
        self.stream, self.future, self.awaits_mask = stream, future, awaits_mask

    def supply(self, masks: tuple[np.ndarray, np.ndarray]) -> "OnCpuThread":
        if not self.awaits_mask:
            raise ValueError("this plan awaits no grammar masks")
        forward = self.future
        self.future = self.stream.submit(lambda: forward.result().supply(masks))
        self.awaits_mask = False
        return self

    def done(self) -> bool:
        return not self.awaits_mask and self.future.done()

    def abandon(self) -> "OnCpuThread":
        """As ``AwaitingMask.abandon``, queued on the launch thread behind the forward."""
        if self.awaits_mask:
            forward = self.future
            self.future = self.stream.submit(lambda: forward.result().abandon())
            self.awaits_mask = False
        return self

    def finish(self) -> IterationResult:
        return self.abandon().future.result().finish()
