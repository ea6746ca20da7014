"""Scheduler-level prefix-cache tests: requests over one shared system prompt, and iterations driven
by hand (each sampled row gets a fixed token; no worker)."""

from __future__ import annotations

from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import Sequence

BS = 16
SYSTEM = list(range(100, 100 + 3 * BS))   # a three-block shared prefix


def seq(i: int, prompt: list[int], max_tokens: int = 4) -> Sequence:
    """Request ``i``: greedy, ``max_tokens`` long whatever it samples (EOS ignored)."""
    return Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                    eos_token_ids=(2,), max_model_len=4096)


def run(sched: Scheduler, token: int = 7):
    """One iteration: schedule, and every row that samples samples ``token``."""
    out = sched.schedule()
    sched.update(out, {r.seq.seq_id: token for r in out.rows if r.sample})
    return out


def finish(sched: Scheduler, s: Sequence) -> None:
    while not s.is_finished:
        run(sched)
