"""Per-layer cost tables of one machine, their JSON file and interpolation (docs/design.md, "The
offload policy and cost tables").

All costs are seconds for ONE decoder layer (the policy compares plans per layer; a forward is
``num_layers`` times that):

- ``linr(S)``: dense part of a layer (norms, QKV, RoPE, KV write, O-proj, MLP) for S batch tokens.
- ``pref(S)``: GPU prefill attention of one prompt of S tokens (additive over prompts).
- ``gdec(N)``: GPU decode attention over N context tokens in total (summed over the rows).
- ``cdec(B, N)``: CPU decode attention of B requests holding N context tokens in total.
- ``lnch``: fixed host overhead of one pipeline stage.

Interpolation: piecewise linear between grid points (bilinear for ``cdec``: linear in N along the
two bracketing B rows, then linear in B). Outside the grid it is clamped: below the first point the
first value is kept (small batches cost at least the fixed launch floor measured there, never
less); beyond the last point the last segment's slope continues, clamped at >= 0 so a cost never
falls with size (dense and attention costs keep growing roughly linearly past the grid, so
holding the last value would make big batches look free). A size of 0 means no work and costs 0.

The file is versioned JSON keyed by :class:`CostKey` (model geometry name and shapes, GPU name,
dtype, block size, CPU thread count). A file with another version or key is refused with a message
that names the first difference, so a stale table is never used silently.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Sequence

log = logging.getLogger(__name__)

FORMAT = "neo-cost-model"
FORMAT_VERSION = 1
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "qkv_bias")
CACHE_ENV = "NEO_COST_CACHE_DIR"


class CostModelError(ValueError):
    """A cost file that cannot be used here; the message says why (version, key field, or shape)."""


@dataclasses.dataclass(frozen=True)
class CostKey:
    """What a cost table is valid for. Two keys match only when every field is equal."""

    model: str
    shapes: tuple[tuple[str, Any], ...]
    gpu: str
    dtype: str
    block_size: int
    cpu_threads: int
    kernels: str = "torch"  # the GPU worker's kernels (ops: "triton" or the "torch" twins)
    quantization: str = "none"  # the dense layers' weights (geometry.Quantization): FP8 GEMMs time apart

    @classmethod
    def from_geometry(cls, geometry: Any, gpu: str, dtype: str, block_size: int, cpu_threads: int,
                      kernels: str = "torch") -> "CostKey":
        shapes = tuple((f, getattr(geometry, f)) for f in SHAPE_FIELDS)
        return cls(geometry.name, shapes, gpu, dtype, int(block_size), int(cpu_threads), kernels,
                   str(getattr(geometry, "quantization", "none")))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "shapes": dict(self.shapes), "gpu": self.gpu, "dtype": self.dtype,
                "block_size": self.block_size, "cpu_threads": self.cpu_threads, "kernels": self.kernels,
                "quantization": self.quantization}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostKey":
        try:
            shapes = tuple((f, d["shapes"][f]) for f in SHAPE_FIELDS)
            return cls(str(d["model"]), shapes, str(d["gpu"]), str(d["dtype"]), int(d["block_size"]),
                       int(d["cpu_threads"]), str(d.get("kernels", "torch")), str(d.get("quantization", "none")))
        except (KeyError, TypeError) as exc:
            raise CostModelError(f"cost file key lacks {exc}") from None

    def differences(self, other: "CostKey") -> list[str]:
        """Human-readable field differences, ``field: file X != wanted Y`` (self is the file's key)."""
        out = []
        for name in ("model", "gpu", "dtype", "block_size", "cpu_threads", "quantization"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: file {a!r} != wanted {b!r}")
        mine, theirs = dict(self.shapes), dict(other.shapes)
        out += [f"shape {f}: file {mine.get(f)!r} != wanted {theirs.get(f)!r}"
                for f in SHAPE_FIELDS if mine.get(f) != theirs.get(f)]
        return out

    def filename(self) -> str:
        """Readable and unique: the slug says what it is, the hash covers every field."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        slug = "-".join([self.model, self.gpu, self.dtype, f"bs{self.block_size}", f"t{self.cpu_threads}"]
                        + ([self.quantization] if self.quantization != "none" else []))
        slug = re.sub(r"[^A-Za-z0-9_.]+", "-", slug).strip("-").lower()
        return f"cost-v{FORMAT_VERSION}-{slug}-{digest}.json"


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear in ``x`` over increasing ``xs``; clamped extrapolation (module docstring)."""
    if x <= xs[0] or len(xs) == 1:  # below the grid (or a one-point grid): the first value
        return float(ys[0])
    i = bisect.bisect_right(xs, x) - 1
    if i >= len(xs) - 1:  # beyond the grid: continue the last segment, never downwards
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return float(ys[-1] + slope * (x - xs[-1]))
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + t * (ys[i + 1] - ys[i]))


def _check_axis(name: str, xs: Sequence[float]) -> None:
    if not xs:
        raise CostModelError(f"{name}: empty grid")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise CostModelError(f"{name}: grid must be strictly increasing, got {list(xs)}")
    if xs[0] < 1:
        raise CostModelError(f"{name}: grid starts at {xs[0]}, sizes are >= 1")


def _check_values(name: str, ys: Sequence[float], n: int) -> None:
    if len(ys) != n:
        raise CostModelError(f"{name}: {len(ys)} values for {n} grid points")
    if any(not (y >= 0.0) for y in ys):  # also refuses NaN
        raise CostModelError(f"{name}: costs must be finite and >= 0")


@dataclasses.dataclass
class CostTables:
    """The profiled tables of one machine and model; the four cost functions plus ``lnch``.

    ``*_x`` are grid sizes, ``*_y`` seconds per layer at those sizes; ``cdec_y[i][k]`` is the cost at
    ``cdec_b[i]`` requests and ``cdec_n[k]`` tokens. ``meta`` records how they were measured.
    """

    key: CostKey
    linr_x: list[int]
    linr_y: list[float]
    pref_x: list[int]
    pref_y: list[float]
    gdec_x: list[int]
    gdec_y: list[float]
    cdec_b: list[int]
    cdec_n: list[int]
    cdec_y: list[list[float]]
    lnch: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("linr", "pref", "gdec"):
            xs, ys = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            _check_axis(name, xs)
            _check_values(name, ys, len(xs))
        _check_axis("cdec B", self.cdec_b)
        _check_axis("cdec N", self.cdec_n)
        if len(self.cdec_y) != len(self.cdec_b):
            raise CostModelError(f"cdec: {len(self.cdec_y)} rows for {len(self.cdec_b)} B values")
        for row in self.cdec_y:
            _check_values("cdec", row, len(self.cdec_n))
        if not self.lnch >= 0.0:
            raise CostModelError("lnch must be >= 0")

    # -- the cost functions (seconds per layer) -------------------------------------------------
    def linr(self, tokens: float) -> float:
        return 0.0 if tokens <= 0 else interp1(self.linr_x, self.linr_y, tokens)

    def pref(self, tokens: float) -> float:
        return 0.0 if tokens <= 0 else interp1(self.pref_x, self.pref_y, tokens)

    def gdec(self, tokens: float) -> float:
        return 0.0 if tokens <= 0 else interp1(self.gdec_x, self.gdec_y, tokens)

    def cdec(self, requests: float, tokens: float) -> float:
        if requests <= 0 or tokens <= 0:
            return 0.0
        bs = self.cdec_b
        if len(bs) == 1:
            return interp1(self.cdec_n, self.cdec_y[0], tokens)
        i = min(max(bisect.bisect_right(bs, requests) - 1, 0), len(bs) - 2)
        lo = interp1(self.cdec_n, self.cdec_y[i], tokens)
        hi = interp1(self.cdec_n, self.cdec_y[i + 1], tokens)
        # The same clamped rule along B, on the two interpolated values.
        return interp1((bs[i], bs[i + 1]), (lo, hi), requests) if requests >= bs[0] else lo

    def prefill_chunk(self, new_tokens: int, start: int = 0) -> float:
        """Attention of a prompt chunk at offset ``start``: the causal area it adds, pref(end) - pref(start)."""
        return max(0.0, self.pref(start + new_tokens) - self.pref(start))

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "key": self.key.to_dict(), "unit": "seconds per layer",
            "linr": {"x": self.linr_x, "y": self.linr_y}, "pref": {"x": self.pref_x, "y": self.pref_y},
            "gdec": {"x": self.gdec_x, "y": self.gdec_y},
            "cdec": {"b": self.cdec_b, "n": self.cdec_n, "y": self.cdec_y},
            "lnch": self.lnch, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], expect: CostKey | None = None) -> "CostTables":
        """Parse and validate; refuses another format, version or (when given) key."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CostModelError(f"not a {FORMAT} file")
        version = d.get("version")
        if version != FORMAT_VERSION:
            age = "older" if isinstance(version, int) and version < FORMAT_VERSION else "other"
            raise CostModelError(f"cost file version {version!r} is {age} than this build's {FORMAT_VERSION}; "
                                 "re-run `neo profile`")
        key = CostKey.from_dict(d.get("key") or {})
        if expect is not None and key != expect:
            raise CostModelError("cost file is for another setup: " + "; ".join(key.differences(expect)))
        try:
            return cls(key, list(d["linr"]["x"]), [float(y) for y in d["linr"]["y"]],
                       list(d["pref"]["x"]), [float(y) for y in d["pref"]["y"]],
                       list(d["gdec"]["x"]), [float(y) for y in d["gdec"]["y"]],
                       list(d["cdec"]["b"]), list(d["cdec"]["n"]),
                       [[float(y) for y in row] for row in d["cdec"]["y"]],
                       float(d["lnch"]), dict(d.get("meta") or {}))
        except (KeyError, TypeError) as exc:
            raise CostModelError(f"cost file lacks or garbles {exc}") from None

    def save(self, path: str) -> str:
        """Write atomically (a reader never sees half a file); returns the path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str, expect: CostKey | None = None) -> "CostTables":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"{path}: not JSON ({exc})") from None
        try:
            return cls.from_dict(data, expect)
        except CostModelError as exc:
            raise CostModelError(f"{path}: {exc}") from None


def default_cache_dir() -> str:
    """``$NEO_COST_CACHE_DIR``, else ``$XDG_CACHE_HOME/neo/cost`` (``~/.cache/neo/cost``)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "neo", "cost")


def cache_path(key: CostKey, cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), key.filename())


def find(key: CostKey, cache_dir: str | None = None) -> CostTables | None:
    """The cached tables for ``key``, or None (absent, or refused: the reason is logged)."""
    path = cache_path(key, cache_dir)
    if not os.path.exists(path):
        log.info("no cost tables for %s at %s", key.model, path)
        return None
    try:
        tables = CostTables.load(path, expect=key)
    except CostModelError as exc:
        log.warning("ignoring cost tables: %s", exc)
        return None
    log.info("cost tables for %s loaded from %s", key.model, path)
    return tables
