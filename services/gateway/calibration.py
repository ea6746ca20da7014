"""Online correction of the pipelined plan's cost from measured forwards.

The profiled tables time each piece of a stage on its own; what they miss is what only the whole
pipelined forward pays: launching two sub-batches' kernels layer by layer from Python (the
sequential plan replays a CUDA graph instead), the doorbell handoffs, and with tensor parallelism
the ranks' all-reduces. Where that is large (a 70B model over two GPUs measured 267 ms per
pipelined forward against 87 ms predicted) the policy would keep choosing a plan that loses, and
keep sending requests to the host pool for it. So after every pipelined iteration the scheduler
compares the measured forward with the tables' prediction and keeps a moving estimate of the
extra time per pipelined stage, which ``offload_policy.decide`` adds to the pipelined plan (never to
the sequential one). Once the estimate says pipelining loses, the policy stops choosing it and the
admission and swap gates stop placing requests on the CPU: NEO falls back to GPU-only behaviour.
The estimate is never negative (a forward faster than predicted does not make pipelining look
cheaper than its tables) and is kept until the process restarts.
"""

from __future__ import annotations

from neo_gateway.offload_policy import OffloadDecision, PlanKind

WEIGHT = 0.25   # of each new measurement in the moving estimate: a handful of iterations converge


class PipelineCalibration:
    """The learnt extra cost of a pipelined stage.

    - ``overhead_s``: seconds per pipelined stage beyond the tables (starts at 0).
    - ``samples``: pipelined iterations measured so far.
    - ``enabled``: False keeps ``overhead_s`` at 0 (``--calibrate-pipeline false``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.overhead_s = 0.0
        self.samples = 0

    def observe(self, decision: OffloadDecision | None, forward_s: float, num_layers: int) -> None:
        """Fold in one iteration: ``forward_s`` is its measured decoder forward (swaps excluded)."""
        if not self.enabled or decision is None or decision.kind != PlanKind.PIPELINED or forward_s <= 0:
            return
        predicted = sum(stage.stage_s for stage in decision.stages) * num_layers   # the tables alone
        sample = max(0.0, (forward_s - predicted) / (2 * num_layers))
        self.overhead_s = sample if self.samples == 0 else self.overhead_s + WEIGHT * (sample - self.overhead_s)
        self.samples += 1
