"""Where the blocks of a cached prefix should come from, priced with the offload policy's cost tables
(docs/design.md, "Prefix caching").

A prompt's cached blocks may sit in the GPU pool (shared as they are), in the host tier, or nowhere.
For host blocks the scheduler has three ways on:

- **swap in**: copy them to fresh GPU blocks before the forward (PCIe, ``copy_s``), prefill the rest;
- **recompute**: prefill them again on the GPU (``prefill_s``: the dense work they add to the batch,
  ``linr`` above the one-token floor every forward pays anyway, plus their attention, ``pref``);
- **CPU direct** (only when the policy places the request on the CPU): its table takes the host
  blocks as they are, no copy, and the prompt tokens after them are fed to the CPU one per
  iteration, as decode rows (the CPU kernel attends one query per row). That costs the GPU almost
  nothing but makes this request wait ``tail - 1`` iterations longer for its first token.

``swap_in_pays`` compares GPU time: swap in when copy + the shorter prefill < the longer prefill.
``cpu_direct_pays`` compares waiting: the prefill a recompute runs delays every running request
(and this one) by its GPU time; CPU direct delays only this one, by ``tail - 1`` iterations. It
goes direct when ``(tail - 1) * step_s <= (running + 1) * saved_s``: under load the GPU time a
recompute costs the batch outweighs one request's extra iterations; on an idle replica it does not.

The PCIe rate is not in the tables: an emulated GPU's is its preset's, a real one's a conservative
``DEFAULT_PCIE_GBS`` (pinned copies of one direction on PCIe 4.0 x16 run at ~25 GB/s, on 5.0 ~50).
"""

from __future__ import annotations

from neo_common.cost_model import CostTables
from neo_common.gpu_presets import GPU_PRESETS

DEFAULT_PCIE_GBS = 20.0
KV_BYTES = 2   # the host pool holds 16-bit KV (CacheConfig.resolve_kv_dtype), and swaps copy it verbatim


def num_layers(costs: CostTables) -> int:
    return int(dict(costs.key.shapes)["num_layers"])


def kv_block_bytes(costs: CostTables) -> int:
    """Bytes of one KV block (K and V, every layer) of the model the tables describe."""
    shapes = dict(costs.key.shapes)
    return 2 * shapes["num_layers"] * shapes["num_kv_heads"] * shapes["head_dim"] * costs.key.block_size * KV_BYTES


def pcie_gbs(costs: CostTables) -> float:
    """Host<->device copy rate (GB/s): the emulated preset's, else ``DEFAULT_PCIE_GBS``."""
    gpu = costs.key.gpu
    if gpu.startswith("emulated "):
        preset = GPU_PRESETS.get(gpu.split()[1])
        if preset is not None:
            return preset.pcie_gbs
    return DEFAULT_PCIE_GBS


def copy_s(costs: CostTables, blocks: int) -> float:
    return blocks * kv_block_bytes(costs) / (pcie_gbs(costs) * 1e9)


def prefill_s(costs: CostTables, start: int, new: int) -> float:
    """GPU time ``new`` prompt tokens from position ``start`` add to a forward."""
    if new <= 0:
        return 0.0
    return num_layers(costs) * (costs.linr(1 + new) - costs.linr(1) + costs.prefill_chunk(new, start))


def swap_in_pays(costs: CostTables | None, first_host: int, hit: int, host_blocks: int, prompt_len: int,
                 block_size: int) -> bool:
    """Copy ``host_blocks`` (of a ``hit`` blocks long cached prefix whose first ``first_host`` blocks
    are on the GPU) rather than prefill from block ``first_host`` on? Always without tables."""
    if costs is None:
        return True
    start, end = first_host * block_size, hit * block_size
    with_copy = copy_s(costs, host_blocks) + prefill_s(costs, end, prompt_len - end)
    return with_copy < prefill_s(costs, start, prompt_len - start)


def cpu_direct_pays(costs: CostTables | None, prompt_len: int, tail: int, step_s: float, running: int) -> bool:
    """Decode a CPU-placed prompt against its host blocks, feeding the ``tail`` tokens after them one
    per iteration of ``step_s``, rather than prefill it whole? (``running``: requests it shares the
    iterations with.)"""
    if tail <= 1 or costs is None:
        return True
    saved = prefill_s(costs, 0, prompt_len) - tail * num_layers(costs) * (costs.linr(2) - costs.linr(1))
    return (tail - 1) * step_s <= (running + 1) * saved
