"""Run one iteration plan: swaps, the forward (flat, or pipelined when rows live on the CPU), sampling.

The runner is the worker's only state besides the weights: the KV pool ``[layers, 2, blocks,
block_size, kv_heads, head_dim]`` (and, with offloading, the host pool in the shared segment), whose
contents the gateway's block managers account for.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from neo_common.protocol import PLACEHOLDER_TOKEN, IterationPlan, IterationResult, Place
from neo_gpu_worker.batch import build_sub_batch, to_device
from neo_gpu_worker.cuda_graph import DecodeGraphs
from neo_gpu_worker.emulation import Emulator
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.launched import AwaitingMask, Forwarded, Launched, OnCpuThread, Timer
from neo_gpu_worker.logprobs import SampledLogprobs, flat_positions, prompt_logprobs
from neo_gpu_worker.models.protocol import CausalLM
from neo_gpu_worker.parallel import TensorParallel
from neo_gpu_worker.pipeline import PipelinedExecutor
from neo_gpu_worker.sampler import PenaltyHistory, SamplingBatch, sample
from neo_gpu_worker.stage_graphs import StageGraphs

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model and the KV pool on one device.

    - ``kv_cache``: allocated once at start; ``num_blocks`` of ``block_size`` tokens per layer, in
      the KV dtype (16-bit with offloading: swaps copy blocks verbatim to the host pool), plus one
      scratch block (index ``num_blocks``, never handed out) that CUDA-graph padding rows write.
    - ``graphs``: captured decode forwards (None: every iteration runs eagerly). The pipeline's
      captured dense stages (``stage_graphs.StageGraphs``, None: eager) come captured already: the
      worker captures them before it sizes the KV pool.
    - ``last_sample``: (request ids, device tokens) the last launched iteration sampled, which fill
      the next plan's placeholder tokens (async scheduling); None after a failed launch.
    - ``host``: the shared host KV segment (None in GPU-only mode); ``pipeline`` runs the plans that
      hold CPU-resident rows.
    - ``generator``: device RNG for unseeded sampling.
    - ``tp``: the tensor-parallel group (None: one rank). Rank 0 samples and broadcasts the tokens;
      the other ranks compute no logits and keep the broadcast tokens as their ``last_sample``.
    - ``emulator``: GPU emulation for benchmarks (None: off); brackets every GPU stage and copy
      (``emulation.py``).
    - ``cpu_stream``: on the CPU device, the one thread launches run on (None on CUDA, where the
      device's stream already runs them behind the host's back).
    - ``demote_stream``: on CUDA with a host pool, the side stream the prefix cache's demotions run
      on beside the forward (None: they run in order with the swaps; also under GPU emulation,
      which paces copies on the main stream); ``demoted``: the event the next plan waits for.
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_dtype: torch.dtype, host: HostKv | None = None, staging_blocks: int = 0,
                 cpu_timeout_s: float = 60.0, graph_max_batch: int = 0, max_model_len: int = 0,
                 tp: TensorParallel | None = None, stage_graphs: StageGraphs | None = None,
                 emulator: Emulator | None = None) -> None:
        g = model.geometry
        self.tp = tp if tp is not None and tp.world > 1 else None
        self.model, self.device, self.block_size, self.num_blocks = model, device, block_size, num_blocks
        self.kv_cache = torch.zeros((g.num_layers, 2, num_blocks + 1, block_size, g.num_kv_heads, g.head_dim),
                                    dtype=kv_dtype, device=device)
        self.host = host
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.last_sample: tuple[np.ndarray, torch.Tensor] | None = None
        self.graphs = None
        if graph_max_batch:
            self.graphs = DecodeGraphs(model, self.kv_cache, block_size, num_blocks, graph_max_batch,
                                       max_model_len or g.max_position_embeddings)
            with torch.inference_mode():
                self.graphs.capture()
        self.pipeline = None if host is None else PipelinedExecutor(
            model, self.kv_cache, host, block_size, staging_blocks, device, cpu_timeout_s, stage_graphs, emulator)
        self.emulator = emulator
        self.cpu_stream = None if device.type == "cuda" else ThreadPoolExecutor(1, "cpu-stream")
        self.demote_stream = (torch.cuda.Stream(device) if device.type == "cuda" and host is not None
                              and emulator is None else None)
        self.demoted: torch.cuda.Event | None = None

    def close(self) -> None:
        """Let queued work end before the host segment it may read or write goes."""
        if self.cpu_stream is not None:
            self.cpu_stream.shutdown(wait=True, cancel_futures=True)
        elif self.host is not None:
            torch.cuda.synchronize(self.device)
        if self.host is not None:
            self.host.close()

    # -- execution ----------------------------------------------------------------------------
    def execute(self, plan: IterationPlan) -> IterationResult:
        """Run ``plan`` and wait for its tokens."""
        return self.launch(plan).finish()

    def launch(self, plan: IterationPlan) -> "Launched | AwaitingMask | OnCpuThread":
        """Queue ``plan``'s work (forward, sampling, the tokens' copy to the host) and return
        without waiting for it, so the worker can queue the next plan behind it (placeholder tokens
        come from this one's device tokens). Swaps and pipelined forwards wait inside (for the
        copies, for CPU attention). A plan with ``bitmask_deferred`` returns with its sampling not
        queued yet (``awaits_mask``): ``supply`` it the masks, then the next plan may follow."""
        if self.cpu_stream is not None:
            deferred = plan.bitmask_deferred and (self.tp is None or self.tp.rank == 0)
            return OnCpuThread(self.cpu_stream, self.cpu_stream.submit(self._launch, plan), deferred)
        return self._launch(plan)

    @torch.inference_mode()
    def _launch(self, plan: IterationPlan) -> Launched | AwaitingMask:
        forwarded = self._forward(plan)
        if isinstance(forwarded, Launched):
            return forwarded
        if plan.bitmask_deferred and (self.tp is None or self.tp.rank == 0):
            if len(forwarded.sample_rows):   # the LM head does not wait for the masks
                forwarded.logits = self._lm_head(forwarded)
            return AwaitingMask(plan.iteration_id, lambda masks: self._sample(forwarded, masks))
        return self._sample(forwarded, (plan.bitmask, plan.bitmask_index))

    def _forward(self, plan: IterationPlan) -> "Forwarded | Launched":
        if self.demoted is not None:   # the previous plan's demotions end before this plan touches a block
            torch.cuda.current_stream(self.device).wait_event(self.demoted)
            self.demoted = None
        timer = Timer(self.device)     # (after that wait: this plan's times are its own)
        try:
            fill = self._placeholders(plan)
        finally:
            self.last_sample = None  # set again only by a successful iteration
        result = IterationResult(iteration_id=plan.iteration_id)
        self.copy_blocks(plan, timer)
        self.demote(plan)
        if plan.batch_size == 0:
            timer.mark()   # no forward
            return Launched(result, timer)
        sample_rows = np.flatnonzero(plan.sample)
        rows_on = to_device(self.device)   # a blocking copy would wait for the plan queued ahead
        if np.any(plan.places != Place.GPU):
            if self.pipeline is None:
                raise ValueError("plan holds CPU-resident rows but this worker has no host KV pool")
            hidden, rows = self.pipeline.forward(plan)
            result.cpu_wait_s = self.pipeline.handoff.cpu_wait_s
            where = np.empty(plan.batch_size, np.int64)
            where[rows] = np.arange(len(rows))
            last = hidden[rows_on(where[sample_rows])]
            hidden_at = self._pipelined_positions(self.pipeline.take_hidden())
        else:
            emu = self.emulator
            if emu:
                emu.main.begin()
            if self.graphs is not None and self.graphs.can_run(plan):
                hidden = self.graphs.run(plan, fill)   # one token per row: row i's is hidden[i]
                offsets = np.arange(plan.batch_size)
                last = hidden[rows_on(sample_rows)]
            else:
                sb = build_sub_batch(plan, np.arange(plan.batch_size), self.block_size, self.device, 0)
                if fill is not None:
                    sb.input_ids[fill[0]] = fill[1]
                hidden = self.model(sb.input_ids, sb.positions, self.kv_cache, sb.meta)
                last = hidden[rows_on(sb.last_token[sample_rows])]
                offsets = sb.last_token - plan.num_tokens.astype(np.int64) + 1

            def hidden_at(rows, first, count, hidden=hidden, offsets=offsets):
                return hidden[rows_on(flat_positions(offsets, rows, first, count))]

            if emu:
                emu.main.work(emu.roofline.forward(plan, np.arange(plan.batch_size)))
        timer.mark()
        return Forwarded(plan, result, timer, fill, sample_rows, last, hidden_at)

    @torch.inference_mode()
    def _lm_head(self, fw: Forwarded) -> torch.Tensor:
        """The sampled rows' logits (bracketed as the LM head's roofline under GPU emulation)."""
        if self.emulator:
            self.emulator.main.begin()
        logits = self.model.compute_logits(fw.last)
        if self.emulator:
            self.emulator.main.work(self.emulator.roofline.lm_head(len(fw.sample_rows)))
        return logits

    @torch.inference_mode()
    def _sample(self, fw: Forwarded, masks: tuple[np.ndarray, np.ndarray] | None) -> Launched:
        """Queue the logits, the sampling (the plan's ``bitmask_rows`` under ``masks``: distinct
        masks and each row's index, the plan's or the ``GrammarBitmask``'s; None: unmasked; unread
        on the ranks that do not sample) and the tokens' copy to the host behind ``fw``'s forward."""
        plan, result, sample_rows = fw.plan, fw.result, fw.sample_rows
        tokens, logprobs = None, None
        if self.tp is None or self.tp.rank == 0:   # rank 0 holds the logits (see ``tp``)
            prompt = prompt_logprobs(plan, fw.hidden_at, self.model.compute_logits)
            logprobs = (None, (plan, prompt.to_host())) if prompt is not None else None
        if len(sample_rows) and self.tp is not None and self.tp.rank > 0:
            sampled = self.tp.broadcast(torch.empty(len(sample_rows), dtype=torch.int64, device=self.device))
            self.last_sample = (plan.seq_ids[sample_rows], sampled)
        elif len(sample_rows):
            logits = fw.logits if fw.logits is not None else self._lm_head(fw)
            asked = SampledLogprobs(plan, sample_rows, logits)   # raw: before the sampler's processing
            params = SamplingBatch.from_columns(
                plan.temperature[sample_rows], plan.top_p[sample_rows], plan.top_k[sample_rows],
                plan.seeds[sample_rows], plan.steps[sample_rows], logits.shape[-1], self.device,
                plan.min_p[sample_rows] if len(plan.min_p) else None, _sampled_bias(plan, sample_rows),
                plan.penalties[sample_rows] if len(plan.penalties) else None,
                _sampled_history(plan, sample_rows, fw.fill, self.device) if len(plan.penalties) else None,
                _sampled_bitmask(plan, sample_rows, masks))
            sampled = sample(logits, params, self.generator)
            if self.tp is not None:
                self.tp.broadcast(sampled)
            result.seq_ids = plan.seq_ids[sample_rows]
            tokens = sampled.to(torch.int32).to("cpu", non_blocking=True)  # into pinned memory on CUDA
            self.last_sample = (result.seq_ids, sampled)
            if asked:
                logprobs = ((asked.seq_ids, asked.of(sampled).to_host()), logprobs[1] if logprobs else None)
        return Launched(result, fw.timer, tokens, logprobs)

    def _pipelined_positions(self, kept):
        """``hidden_at`` of a pipelined forward: positions of each sub-batch's hidden states."""
        if kept is None:
            return None
        hidden, sbs = kept
        rows_on = to_device(self.device)

        def hidden_at(rows, first, count):
            parts = []
            for row, f, c in zip(rows, first, count):
                j = next(j for j, sb in enumerate(sbs) if hidden[j] is not None and row in sb.rows)
                sb = sbs[j]
                i = int(np.flatnonzero(sb.rows == row)[0])
                start = int(sb.last_token[i]) - int(self._n_tokens_of(sb, i)) + 1 + int(f)
                parts.append(hidden[j][rows_on(np.arange(start, start + int(c)))])
            return torch.cat(parts)
        return hidden_at

    @staticmethod
    def _n_tokens_of(sb, i: int) -> int:
        return int(sb.last_token[i] - (sb.last_token[i - 1] if i else -1))

    def _placeholders(self, plan: IterationPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token indices, tokens on the device) for the plan's placeholder tokens: what the
        previous iteration sampled for those requests, never copied through the host."""
        rows = np.flatnonzero(plan.token_ids == PLACEHOLDER_TOKEN)
        if not len(rows):
            return None
        if not (np.all(plan.num_tokens == 1) and np.all(plan.places == Place.GPU)):
            raise ValueError("placeholder tokens are only allowed in plans of GPU decode rows")
        if self.last_sample is None:
            raise ValueError("placeholder tokens, but the previous iteration sampled nothing")
        ids, tokens = self.last_sample
        where = {int(s): i for i, s in enumerate(ids)}
        try:
            src = np.array([where[int(s)] for s in plan.seq_ids[rows]], np.int64)
        except KeyError as exc:
            raise ValueError(f"placeholder token of request {exc}, which the previous iteration did not sample") from None
        dev = to_device(self.device)
        return dev(rows), tokens[dev(src)]

    def copy_blocks(self, plan: IterationPlan, timer: Timer) -> None:
        """Swaps between the pools, queued before the forward (whose rows may read or reuse those
        blocks) without the host waiting; ``timer`` marks their end (the result's ``swap_s``). The
        host waits only for a plan with CPU rows that swaps out: the CPU may read those blocks.
        Without a side stream (the CPU device, GPU emulation) the plan's demotions go first here."""
        swap_out = plan.swap_out
        if self.demote_stream is None and len(plan.demote):
            swap_out = np.concatenate([np.asarray(plan.demote).reshape(-1, 3), np.asarray(swap_out).reshape(-1, 3)])
        if not len(swap_out) and not len(plan.swap_in):
            return
        if self.host is None:
            raise ValueError("plan asks for swaps but this worker has no host KV pool")
        if self.emulator:
            self.emulator.main.begin()
        self.host.swap_out(self.kv_cache, swap_out)
        self.host.swap_in(self.kv_cache, plan.swap_in)
        if self.emulator:
            blocks = int(np.asarray(swap_out)[:, 2].sum()) + int(np.asarray(plan.swap_in)[:, 2].sum())
            self.emulator.main.copy(blocks * self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size())
        timer.mark_copied()
        if self.device.type == "cuda" and len(plan.swap_out) and np.any(plan.places != Place.GPU):
            torch.cuda.current_stream(self.device).synchronize()

    def demote(self, plan: IterationPlan) -> None:
        """The plan's demotions (``plan.demote``) on the side stream, beside the forward: no row
        touches those blocks; the next plan waits for them (``demoted``). Without a side stream
        ``copy_blocks`` ran them."""
        if self.demote_stream is None or not len(plan.demote):
            return
        queued = torch.cuda.Event()
        queued.record()   # the blocks' KV is what the work queued so far leaves
        self.demote_stream.wait_event(queued)
        with torch.cuda.stream(self.demote_stream):
            self.host.swap_out(self.kv_cache, plan.demote)
            self.demoted = torch.cuda.Event()
            self.demoted.record()


def kv_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    return model.geometry.kv_bytes_per_block(block_size, torch.empty((), dtype=dtype).element_size())


def num_kv_blocks(model: CausalLM, device: torch.device, block_size: int, dtype: torch.dtype,
                  requested: int, gpu_memory_utilization: float, cpu_device_kv_gb: float) -> int:
    """Blocks to allocate: as asked, else what fits in the device memory budget after the weights."""
    if requested:
        return requested
    per_block = kv_block_bytes(model, block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        # Leave room for activations of a full iteration (a generous fixed margin).
        budget = total * gpu_memory_utilization - used_by_others - 2 * 1024**3
    else:
        budget = cpu_device_kv_gb * 1024**3
    blocks = int(budget // per_block)
    if blocks < 16:
        raise RuntimeError(f"only {blocks} KV blocks fit; lower the model size or raise --gpu-memory-utilization")
    return blocks


def _sampled_bias(plan: IterationPlan, sample_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The plan's logit-bias entries of sampled rows, their rows renumbered as the sampled rows'."""
    if not len(plan.bias_rows):
        return None
    where = np.full(plan.batch_size, -1, np.int64)
    where[sample_rows] = np.arange(len(sample_rows))
    rows = where[plan.bias_rows]
    keep = rows >= 0
    return rows[keep], plan.bias_ids[keep], plan.bias_values[keep]


def _sampled_bitmask(plan: IterationPlan, sample_rows: np.ndarray, masks: tuple[np.ndarray, np.ndarray] | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rows, distinct masks, each row's mask index) of the plan's ``bitmask_rows``, their rows
    renumbered as the sampled rows' (every masked row samples: ``IterationPlan.check``); ``masks``:
    (words, index), an empty index meaning one mask per row; None: sample unmasked."""
    if not len(plan.bitmask_rows) or masks is None:
        return None
    words, index = masks
    if not len(index):
        index = np.arange(words.shape[0], dtype=np.int32)
    if len(index) != len(plan.bitmask_rows) or (len(index) and int(index.max()) >= words.shape[0]):
        raise ValueError(f"iteration {plan.iteration_id}: grammar masks for {len(index)} rows, "
                         f"{len(plan.bitmask_rows)} constrained")
    where = np.full(plan.batch_size, -1, np.int64)
    where[sample_rows] = np.arange(len(sample_rows))
    return where[plan.bitmask_rows], words, index


def _sampled_history(plan: IterationPlan, sample_rows: np.ndarray, fill, device: torch.device) -> PenaltyHistory:
    """The penalty history of sampled rows, renumbered as the sampled rows'; a placeholder row's
    last generated token is the device token ``fill`` feeds it (a placeholder row is one token,
    so its token index is its row)."""
    where = np.full(plan.batch_size, -1, np.int64)
    where[sample_rows] = np.arange(len(sample_rows))
    rows = where[plan.hist_rows]
    keep = rows >= 0
    placeholder = None
    if fill is not None:
        held = np.flatnonzero(plan.token_ids == PLACEHOLDER_TOKEN)
        placeholder = (to_device(device)(where[held]), fill[1].to(torch.int64))
    return PenaltyHistory.from_columns(rows[keep], plan.hist_ids[keep], plan.hist_output[keep], device, placeholder)
