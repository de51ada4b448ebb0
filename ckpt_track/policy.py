"""Backend-independent decisions: which version a selector means, which is best,
and which versions retention deletes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import Retention
from .errors import CheckpointNotFound
from .records import Stored
from .refs import Ref

__all__ = ["best_of", "is_improvement", "retention_plan", "select"]

PROTECTED_ALIASES = frozenset({"latest", "best"})


def _metric(s: Stored, metric: str | None) -> float | None:
    if metric is None:
        return None
    v = s.metrics.get(metric)
    return None if v is None or math.isnan(v) else v


def is_improvement(new: float, old: float | None, mode: str) -> bool:
    """Strict improvement, so the earliest of equal checkpoints stays ``best``."""
    if math.isnan(new):
        return False
    if old is None:
        return True
    return new < old if mode == "min" else new > old


def best_of(stored: Sequence[Stored], metric: str | None, mode: str) -> Stored | None:
    best: Stored | None = None
    for s in sorted(stored, key=lambda s: s.version):
        v = _metric(s, metric)
        if v is not None and is_improvement(v, _metric(best, metric) if best else None, mode):
            best = s
    return best


def _summary(stored: Sequence[Stored]) -> str:
    if not stored:
        return "the run has no committed checkpoints yet"
    steps = sorted({s.step for s in stored})
    shown = ", ".join(map(str, steps[:20])) + (f" ... ({len(steps)} in all)" if len(steps) > 20 else "")
    aliases = sorted({a for s in stored for a in s.aliases if not a.startswith("step-")})
    return (f"available steps: {shown}; versions v1..v{max(s.version for s in stored)}"
            f"{'; aliases: ' + ', '.join(aliases) if aliases else ''}")


def select(stored: Sequence[Stored], ref: Ref) -> Stored:
    """The version a reference selects; :class:`CheckpointNotFound` lists what exists."""
    by_version = sorted(stored, key=lambda s: s.version)
    found: Stored | None = None
    if ref.version is not None:
        found = next((s for s in by_version if s.version == ref.version), None)
    elif ref.step is not None:
        found = next((s for s in reversed(by_version) if s.step == ref.step), None)
    elif ref.alias is not None:
        found = next((s for s in reversed(by_version) if ref.alias in s.aliases), None)
        if found is None and ref.alias == "latest" and by_version:
            found = max(by_version, key=lambda s: (s.step, s.version))  # the highest step
        if found is None and ref.alias.startswith("step-") and ref.alias[5:].isdigit():
            step = int(ref.alias[5:])
            found = next((s for s in reversed(by_version) if s.step == step), None)
    elif by_version:
        latest = [s for s in by_version if "latest" in s.aliases]
        found = latest[-1] if latest else max(by_version, key=lambda s: (s.step, s.version))
    if found is None:
        what = ref.selector.lstrip("@:") or "latest"
        raise CheckpointNotFound(f"{ref}: no checkpoint matches {what!r}; {_summary(by_version)}")
    return found


def retention_plan(stored: Sequence[Stored], retention: Retention, metric: str | None, mode: str) -> list[Stored]:
    """Versions to delete; never one holding ``latest``, ``best`` or a user alias."""
    if not retention.enabled():
        return []
    metric = retention.metric or metric
    mode = retention.mode or mode
    by_version = sorted(stored, key=lambda s: s.version)
    keep: set[int] = set()
    if retention.keep_last:  # the newest by step: an older checkpoint uploaded late is not "newer"
        by_step = sorted(stored, key=lambda s: (s.step, s.version))
        keep.update(s.version for s in by_step[-retention.keep_last:])
    if retention.keep_best:
        scored = [s for s in by_version if _metric(s, metric) is not None]
        sign = 1.0 if mode == "min" else -1.0
        scored.sort(key=lambda s: (sign * _metric(s, metric), s.version))  # type: ignore[operator]
        keep.update(s.version for s in scored[: retention.keep_best])
    if retention.keep_every:
        keep.update(s.version for s in by_version if s.step % retention.keep_every == 0)
    for s in by_version:
        if any(a in PROTECTED_ALIASES or not a.startswith("step-") for a in s.aliases):
            keep.add(s.version)
    return [s for s in by_version if s.version not in keep]
