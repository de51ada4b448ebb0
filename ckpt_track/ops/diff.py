"""What differs between two checkpoints: metric deltas, per-tensor differences, non-tensor state.

Both checkpoints are verified against their manifests first, and tensors are read one at
a time, so two checkpoints larger than memory can still be compared."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..records import Stored
from ..refs import Ref
from ..resolve import Resolver
from ._common import SettingsLike, TensorReader, as_settings, bits_equal, wide

__all__ = ["CheckpointDiff", "MetricDelta", "TensorDelta", "TensorStatus", "diff"]


@dataclass(frozen=True)
class MetricDelta:
    """One metric of two checkpoints; ``delta`` is ``b - a`` (None when either lacks it)."""

    name: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def changed(self) -> bool:
        if self.a is None or self.b is None:
            return self.a is not self.b
        if math.isnan(self.a) and math.isnan(self.b):
            return False
        return self.a != self.b


TensorStatus = Literal["unchanged", "changed", "shape", "only_a", "only_b"]


@dataclass(frozen=True)
class TensorDelta:
    """One tensor of two checkpoints.

    ``status``: ``unchanged`` (bit-identical), ``changed`` (same shape, other values),
    ``shape`` (shapes differ), ``only_a`` / ``only_b``.  For ``changed``, ``max_abs``
    is max |a - b| and ``rel_l2`` is ||a - b|| / ||a|| (``inf`` when ``a`` is all zeros).
    """

    name: str
    status: TensorStatus
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None
    rel_l2: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status,
            "shape_a": None if self.shape_a is None else list(self.shape_a),
            "shape_b": None if self.shape_b is None else list(self.shape_b),
            "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "max_abs": self.max_abs, "rel_l2": self.rel_l2,
        }


@dataclass(frozen=True)
class CheckpointDiff:
    """What differs between two checkpoints ``a`` and ``b``."""

    a: Stored
    b: Stored
    metrics: tuple[MetricDelta, ...]
    tensors: tuple[TensorDelta, ...]
    state_keys: tuple[str, ...]  # top-level state.json entries (non-tensor state) that differ

    @property
    def changed_tensors(self) -> list[TensorDelta]:
        return [t for t in self.tensors if t.status != "unchanged"]

    @property
    def changed(self) -> bool:
        """True when any tensor, metric or non-tensor state differs."""
        return bool(self.changed_tensors or self.state_keys or any(m.changed for m in self.metrics))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("unchanged", "changed", "shape", "only_a", "only_b"), 0)
        for t in self.tensors:
            out[t.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "a": str(self.a.ref), "b": str(self.b.ref), "step_a": self.a.step, "step_b": self.b.step,
            "changed": self.changed, "counts": self.counts(),
            "metrics": [{"name": m.name, "a": m.a, "b": m.b, "delta": m.delta, "changed": m.changed}
                        for m in self.metrics],
            "tensors": [t.to_json() for t in self.tensors],
            "state": list(self.state_keys),
        }


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDelta:
    common = {"shape_a": tuple(a.shape), "shape_b": tuple(b.shape), "dtype_a": str(a.dtype).removeprefix("torch."),
              "dtype_b": str(b.dtype).removeprefix("torch.")}
    if a.shape != b.shape:
        return TensorDelta(name, "shape", **common)
    if bits_equal(a, b):
        return TensorDelta(name, "unchanged", **common)
    if a.numel() == 0:
        return TensorDelta(name, "changed", **common, max_abs=0.0, rel_l2=0.0)
    wa, wb = wide(a), wide(b)
    d = wb - wa
    max_abs = float(d.abs().max())
    dist, norm = float(torch.linalg.vector_norm(d)), float(torch.linalg.vector_norm(wa))
    rel = dist / norm if norm > 0 else (0.0 if dist == 0 else math.inf)
    return TensorDelta(name, "changed", **common, max_abs=max_abs, rel_l2=rel)


def _describe(name: str, t: torch.Tensor, side: Literal["only_a", "only_b"]) -> TensorDelta:
    shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
    if side == "only_a":
        return TensorDelta(name, side, shape_a=shape, dtype_a=dtype)
    return TensorDelta(name, side, shape_b=shape, dtype_b=dtype)


def diff(a: str | Ref, b: str | Ref, *, prefix: str | None = None, settings: SettingsLike = None) -> CheckpointDiff:
    """Metric deltas and per-tensor differences between checkpoints ``a`` and ``b``.

    ``prefix`` limits the tensors compared (e.g. ``"model/"``).  Both checkpoints are
    verified against their manifests first.

    >>> d = diff("local://p/r:v1", "local://p/r:v2")        # doctest: +SKIP
    >>> [(t.name, t.rel_l2) for t in d.changed_tensors]     # doctest: +SKIP
    [('model/weight', 0.031)]
    """
    resolver = Resolver(as_settings(settings), skip_damaged=True)
    found_a, found_b = resolver.resolve(a), resolver.resolve(b)
    ckpt_a, ckpt_b = found_a.fetch_verified(), found_b.fetch_verified()
    ma, mb = ckpt_a.manifest.metrics, ckpt_b.manifest.metrics
    metrics = tuple(MetricDelta(n, ma.get(n), mb.get(n)) for n in sorted(set(ma) | set(mb)))
    deltas: list[TensorDelta] = []
    with contextlib.ExitStack() as stack:
        ra, rb = TensorReader(ckpt_a, stack), TensorReader(ckpt_b, stack)
        names_a, names_b = ra.names(), rb.names()
        for name in sorted(names_a | names_b):
            if prefix and not name.startswith(prefix):
                continue
            if name not in names_b:
                deltas.append(_describe(name, ra.get(name), "only_a"))
            elif name not in names_a:
                deltas.append(_describe(name, rb.get(name), "only_b"))
            else:
                deltas.append(_compare(name, ra.get(name), rb.get(name)))
        sa, sb = ra.state(), rb.state()
    state_keys = tuple(k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k))
    return CheckpointDiff(found_a.stored, found_b.stored, metrics, tuple(deltas), state_keys)

