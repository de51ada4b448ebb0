"""Backend-independent decisions: which version a selector means, which is best,
and which versions retention deletes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import Retention
from .errors import CheckpointNotFound
from .records import Stored
from .refs import Ref

__all__ = ["best_of", "is_improvement", "retention_plan", "retention_reasons", "select"]

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


def _spans(numbers: Sequence[int]) -> str:
    """``v1..v3, v5, v7..v8``: which versions exist, contiguous runs shortened."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    shown = [f"v{a}" if a == b else f"v{a}..v{b}" for a, b in spans]
    return ", ".join(shown[:20]) + (f" ... ({len(set(numbers))} in all)" if len(shown) > 20 else "")


def _summary(stored: Sequence[Stored]) -> str:
    if not stored:
        return "the run has no committed checkpoints yet"
    steps = sorted({s.step for s in stored})
    shown = ", ".join(map(str, steps[:20])) + (f" ... ({len(steps)} in all)" if len(steps) > 20 else "")
    aliases = sorted({a for s in stored for a in s.aliases if not a.startswith("step-")})
    # the versions that exist: after gc or a delete the numbers have gaps
    return (f"available steps: {shown}; versions {_spans([s.version for s in stored])}"
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


def retention_reasons(stored: Sequence[Stored], retention: Retention, metric: str | None,
                      mode: str) -> dict[int, tuple[str, ...]]:
    """Version -> the rules that keep it (``keep_last``, ``keep_best``, ``keep_every``,
    ``alias latest``, ``alias best``, ``alias <yours>``); a version no rule keeps maps to ``()``.

    >>> retention_reasons(stored, Retention(keep_last=1), "val/loss", "min")  # doctest: +SKIP
    {1: (), 2: ('keep_last', 'alias latest')}
    """
    by_version = sorted(stored, key=lambda s: s.version)
    reasons: dict[int, list[str]] = {s.version: [] for s in by_version}
    if not retention.enabled():
        return {v: ("no rule",) for v in reasons}  # retention off: nothing is deleted
    metric = retention.metric or metric
    mode = retention.mode or mode
    if retention.keep_last:  # the newest by step: an older checkpoint uploaded late is not "newer"
        by_step = sorted(stored, key=lambda s: (s.step, s.version))
        for s in by_step[-retention.keep_last:]:
            reasons[s.version].append("keep_last")
    if retention.keep_best:
        scored = [s for s in by_version if _metric(s, metric) is not None]
        sign = 1.0 if mode == "min" else -1.0
        scored.sort(key=lambda s: (sign * _metric(s, metric), s.version))  # type: ignore[operator]
        for s in scored[: retention.keep_best]:
            reasons[s.version].append("keep_best")
    if retention.keep_every:
        for s in by_version:
            if s.step % retention.keep_every == 0:
                reasons[s.version].append("keep_every")
    for s in by_version:
        reasons[s.version].extend(f"alias {a}" for a in s.aliases if a in PROTECTED_ALIASES
                                  or not a.startswith("step-"))
    return {v: tuple(r) for v, r in reasons.items()}


def retention_plan(stored: Sequence[Stored], retention: Retention, metric: str | None, mode: str) -> list[Stored]:
    """Versions to delete; never one holding ``latest``, ``best`` or a user alias."""
    if not retention.enabled():
        return []
    reasons = retention_reasons(stored, retention, metric, mode)
    return [s for s in sorted(stored, key=lambda s: s.version) if not reasons[s.version]]
