import json
import random

import pytest

from support.cost_tables import BATCH, CTX, TOKENS, key, synthetic
from neo_common import cost_model
from neo_common.cost_model import CostModelError, CostTables, interp1


def test_exact_at_grid_points():
    c = synthetic()
    for x, y in zip(c.linr_x, c.linr_y):
        assert c.linr(x) == pytest.approx(y, rel=1e-12)
    for x, y in zip(c.gdec_x, c.gdec_y):
        assert c.gdec(x) == pytest.approx(y, rel=1e-12)
    for x, y in zip(c.pref_x, c.pref_y):
        assert c.pref(x) == pytest.approx(y, rel=1e-12)
    for i, b in enumerate(BATCH):
        for k, n in enumerate(CTX):
            assert c.cdec(b, n) == pytest.approx(c.cdec_y[i][k], rel=1e-12)


def test_linear_between_and_monotone():
    c = synthetic()
    mid = (TOKENS[2] + TOKENS[3]) / 2
    assert c.linr(mid) == pytest.approx((c.linr_y[2] + c.linr_y[3]) / 2)
    rng = random.Random(1)
    for f in (c.linr, c.pref, c.gdec):
        xs = sorted(rng.uniform(0, 2e6) for _ in range(500))
        ys = [f(x) for x in xs]
        assert all(b >= a for a, b in zip(ys, ys[1:]))
    # bilinear: monotone along each axis between (and beyond) the grid
    for b in (1, 3, 10, 50, 300):
        ys = [c.cdec(b, n) for n in range(1, 2_000_000, 9973)]
        assert all(y2 >= y1 for y1, y2 in zip(ys, ys[1:]))
    for n in (10, 1000, 100_000):
        ys = [c.cdec(b, n) for b in range(1, 400)]
        assert all(y2 >= y1 for y1, y2 in zip(ys, ys[1:]))
    # bilinear at a cell centre is the mean of its four corners
    b, n = (BATCH[1] + BATCH[2]) / 2, (CTX[1] + CTX[2]) / 2
    corners = [c.cdec_y[i][k] for i in (1, 2) for k in (1, 2)]
    assert c.cdec(b, n) == pytest.approx(sum(corners) / 4)


def test_clamped_extrapolation_and_zero():
    assert interp1([10, 20], [1.0, 2.0], 5) == 1.0            # below: first value
    assert interp1([10, 20], [1.0, 2.0], 40) == 4.0           # beyond: last slope continues
    assert interp1([10, 20], [2.0, 1.0], 40) == 1.0           # ...but never downwards
    c = synthetic()
    assert c.linr(0) == c.gdec(0) == c.pref(0) == c.cdec(0, 100) == c.cdec(3, 0) == 0.0


def test_json_round_trip(tmp_path):
    c = synthetic()
    path = c.save(str(tmp_path / "t.json"))
    back = CostTables.load(path, expect=c.key)
    assert back == c
    assert back.cdec(7, 5000) == c.cdec(7, 5000)


def test_refuses_mismatched_key_and_version(tmp_path):
    c = synthetic()
    path = c.save(str(tmp_path / "t.json"))
    with pytest.raises(CostModelError, match="cpu_threads: file 16 != wanted 8"):
        CostTables.load(path, expect=key(cpu_threads=8))
    with pytest.raises(CostModelError, match="gpu: file 'NVIDIA H100' != wanted 'NVIDIA H200'"):
        CostTables.load(path, expect=key(gpu="NVIDIA H200"))
    data = json.loads(open(path).read())
    data["key"]["shapes"]["num_kv_heads"] = 4
    with pytest.raises(CostModelError, match="shape num_kv_heads: file 4 != wanted 8"):
        CostTables.from_dict(data, expect=c.key)
    data = c.to_dict()
    data["version"] = cost_model.FORMAT_VERSION - 1
    with pytest.raises(CostModelError, match="older than this build"):
        CostTables.from_dict(data)
    data = c.to_dict()
    data["linr"]["x"] = [1, 1, 2, 3, 4, 5, 6]
    with pytest.raises(CostModelError, match="strictly increasing"):
        CostTables.from_dict(data)


def test_cache_lookup(tmp_path, caplog):
    c = synthetic()
    d = str(tmp_path)
    assert cost_model.find(c.key, d) is None
    c.save(cost_model.cache_path(c.key, d))
    assert cost_model.find(c.key, d) == c
    other = key(dtype="float16")
    assert cost_model.cache_path(other, d) != cost_model.cache_path(c.key, d)
    # a file at the right name but with another key inside is refused, with the reason logged
    c.save(cost_model.cache_path(other, d))
    assert cost_model.find(other, d) is None
    assert "dtype: file 'bfloat16' != wanted 'float16'" in caplog.text


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(cost_model.CACHE_ENV, str(tmp_path))
    assert cost_model.default_cache_dir() == str(tmp_path)
