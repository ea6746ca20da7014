import glob
import logging
import os
import subprocess
import sys

import pytest
import torch

from neo_common.geometry import GEOMETRIES
from neo_common import cost_model
from neo_common.cost_model import CostKey, CostTables
from neo_gpu_worker import model as model_module
from neo_gpu_worker import profiler
from neo_gpu_worker.attention import AttentionMetadata
from neo_gpu_worker.model import DecoderLayer
from neo_gpu_worker.rope import RotaryEmbedding


def increasing(ys):
    return all(b >= a for a, b in zip(ys, ys[1:]))


@pytest.mark.slow
def test_quick_profile_on_cpu_writes_tables_that_load_back(tmp_path):
    cache = str(tmp_path / "cost")
    cmd = [sys.executable, "-m", "neo_common.cli", "profile", "--quick", "--model", "smollm2-135m",
           "--device", "cpu", "--cpu-threads", "2", "--cache-dir", cache, "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    files = glob.glob(os.path.join(cache, "*.json"))
    assert len(files) == 1 and os.path.basename(files[0]).startswith("cost-v1-smollm2-135m-cpu-float32-bs16-t2-")

    key = CostKey.from_geometry(GEOMETRIES["smollm2-135m"], "cpu", "float32", 16, 2)
    tables = CostTables.load(files[0], expect=key)
    assert cost_model.find(key, cache) == tables
    assert tables.meta["cpu_isa"] and tables.meta["raw"]["cdec"]
    for name in ("linr", "pref", "gdec"):
        ys = getattr(tables, f"{name}_y")
        assert all(y > 0 for y in ys) and increasing(ys), (name, ys)
        fn = getattr(tables, name)
        xs = getattr(tables, f"{name}_x")
        assert increasing([fn(x) for x in range(1, 2 * xs[-1], max(1, xs[-1] // 64))])
    for row in tables.cdec_y:
        assert all(y > 0 for y in row) and increasing(row)
    for k in range(len(tables.cdec_n)):
        assert increasing([row[k] for row in tables.cdec_y])
    assert tables.lnch > 0

    # the next start reuses the file instead of profiling again
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0 and "loaded from" in second.stderr and "profiling" not in second.stderr


def test_dense_part_is_the_layer_without_its_attention(monkeypatch):
    g = GEOMETRIES["smollm2-135m"]
    torch.manual_seed(0)
    layer = DecoderLayer(g).eval()
    rope = RotaryEmbedding(g.head_dim, 64, g.rope_theta, g.rope_scaling, torch.device("cpu"))
    x = torch.randn(5, g.hidden_size)
    pos = torch.arange(5)
    kv = torch.zeros(2, 1, 16, g.num_kv_heads, g.head_dim)
    slots = torch.arange(5)
    # the real layer with attention replaced by "output = q" must equal the profiler's dense part
    monkeypatch.setattr(model_module, "paged_attention", lambda q, kv_layer, meta, scale, softcap=0.0: q)
    meta = AttentionMetadata.for_decodes(slots, torch.zeros((0, 1), dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    with torch.no_grad():
        expected = layer(x, pos, rope, kv.clone(), meta)
        got = profiler.dense_part(layer, x, pos, rope, kv, slots)
    torch.testing.assert_close(got, expected)
    assert kv.abs().sum() > 0, "the KV write is part of the dense cost"


def test_progress_falls_back_to_logging(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails as if tqdm were absent
    caplog.set_level(logging.INFO, logger=profiler.__name__)
    bar = profiler.Progress(20, "profiling x")
    for i in range(20):
        bar.step(f"point {i}")
    bar.close()
    lines = [r.getMessage() for r in caplog.records if "profiling x" in r.getMessage()]
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("profiling x: 20/20")
