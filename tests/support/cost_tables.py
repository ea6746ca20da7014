"""Synthetic cost tables for policy tests: an 8B-class layer on an H100-class GPU with a fast or slow host."""

from __future__ import annotations

from neo_common.geometry import GEOMETRIES
from neo_common.cost_model import CostKey, CostTables

TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
CTX = [16, 256, 4096, 65536, 1048576]
BATCH = [1, 4, 16, 64, 256]


def key(**changes) -> CostKey:
    fields = dict(gpu="NVIDIA H100", dtype="bfloat16", block_size=16, cpu_threads=16)
    fields.update(changes)
    return CostKey.from_geometry(GEOMETRIES["llama-3-8b"], **fields)


def synthetic(cpu_s_per_token: float = 40e-9, cpu_fixed: float = 10e-6, lnch: float = 20e-6,
              gpu_s_per_token: float = 1.2e-9, **key_changes) -> CostTables:
    """linr: 130 us weight-read floor + 0.55 us/token; pref quadratic; gdec and cdec linear in tokens.

    ``cpu_s_per_token`` ~ 4 KB of KV per token per layer over the host's bandwidth (40 ns ~ 100 GB/s).
    """
    return CostTables(
        key=key(**key_changes),
        linr_x=TOKENS, linr_y=[130e-6 + 0.55e-6 * s for s in TOKENS],
        pref_x=TOKENS, pref_y=[5e-6 + 2e-12 * s * s for s in TOKENS],
        gdec_x=CTX, gdec_y=[4e-6 + gpu_s_per_token * n for n in CTX],
        cdec_b=BATCH, cdec_n=CTX,
        cdec_y=[[cpu_fixed + 0.2e-6 * b + cpu_s_per_token * max(n, b) for n in CTX] for b in BATCH],
        lnch=lnch, meta={"synthetic": True},
    )
