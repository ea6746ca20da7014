"""Stand-in for the GPU worker in the two-process tests (run as a script, not collected by pytest).

Creates the segment described by ``<dir>/meta.json``, loads the initial pools, then for every
iteration and layer stages each slot's q/k/v rows, rings its doorbell, waits for completion and keeps
o. Prints READY after creating the segment and DONE after the last job (outputs in ``<dir>/out.npz``),
then waits for a line on stdin (or EOF) and exits, removing the segment. With ``ring_delay_s`` in the
meta, it holds every layer's doorbells that long, as a GPU slower than the CPU would.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from neo_common.segment import KvSegment, SegmentLayout, job_seq


def main(folder: str, name: str) -> int:
    meta = json.load(open(f"{folder}/meta.json"))
    layout = SegmentLayout(**meta["layout"])
    inputs = np.load(f"{folder}/inputs.npz")
    seg = KvSegment.create(name, layout)
    seg.k_pool()[...] = inputs["k_pool"]
    seg.v_pool()[...] = inputs["v_pool"]
    print("READY", flush=True)
    if not sys.stdin.readline():  # EOF instead of "go": the test is tearing down
        seg.close()
        seg.unlink()
        return 0
    outs = {}
    delay_s = float(meta.get("ring_delay_s", 0.0))
    for it, plan in enumerate(meta["iterations"]):
        iteration_id = plan["iteration_id"]
        for layer in range(layout.num_layers):
            active = [s for s, lens in enumerate(plan["seq_lens"]) if lens]
            time.sleep(delay_s)
            for s in active:
                n = len(plan["seq_lens"][s])
                for part in ("q", "k_new", "v_new"):
                    seg.view(part, s)[:n] = inputs[f"{part}_{it}_{layer}_{s}"]
                seg.ring(s, job_seq(iteration_id, layer))
            for s in active:
                status = seg.wait_done(s, job_seq(iteration_id, layer), timeout_s=60)
                assert status == 0, status
                outs[f"o_{it}_{layer}_{s}"] = seg.view("o", s)[:len(plan["seq_lens"][s])].copy()
    outs["k_pool"] = seg.k_pool().copy()
    outs["v_pool"] = seg.v_pool().copy()
    np.savez(f"{folder}/out.npz", **outs)
    print("DONE", flush=True)
    sys.stdin.readline()
    seg.close()
    seg.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
