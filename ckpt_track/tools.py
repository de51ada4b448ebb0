"""Working tools on stored checkpoints: lineage, diff, gc, copy and average.

These are the library functions behind ``ckpt-track lineage / diff / gc / copy /
average``; each works on any backend through the Protocol only::

    from ckpt_track import tools
    tools.lineage("local://resnet/run-b@latest")          # [LineageNode, ...] back to the root
    tools.diff("local://resnet/r:v3", "local://resnet/r:v4").changed_tensors
    tools.gc("mlflow://<run_id>", keep_last=3, keep_best=1, metric="val/loss", dry_run=True).planned
    tools.copy("mlflow://<run_id>", "local://resnet/mirror")
    tools.average(["local://p/r:v3", "local://p/r:v4", "local://p/r:v5"], "./swa")

Copy targets (``to=`` of :func:`copy`, a reference output of :func:`average`)::

    <backend>://<run ref>           an existing run, e.g. mlflow://<run_id>, local://proj/3k2j1x
    <backend>://<project>/<name>    the run with that name (or, where the backend lets us
                                    choose ids, that id) in that project, created if missing;
                                    for MLflow the project is the experiment
    ...?key=value                   backend options for the target, e.g. ?tracking_uri=http://host:5000,
                                    ?root=/data/ckpts (local), ?entity=acme (W&B)

Nothing here unpickles: tensors are read with safetensors, the rest is JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from . import lineage as _lineage
from .protocol import Backend
from .records import RunInfo, RunSpec, Stored
from .config import Retention, Settings, load_settings
from .errors import (
    BackendError,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
    StateMismatch,
)
from .format import STATE, LocalCheckpoint, tensor_files, verify, write_checkpoint
from .policy import PROTECTED_ALIASES, retention_plan, select
from .refs import Ref, parse_ref
from .resolve import Resolved, open_backend
from .resolve import canonical as canonical_ref

__all__ = [
    "AverageResult",
    "CheckpointDiff",
    "CopyResult",
    "GcResult",
    "LineageNode",
    "MetricDelta",
    "TensorDelta",
    "average",
    "copy",
    "diff",
    "gc",
    "lineage",
    "open_target",
]

SettingsLike = Settings | Mapping[str, Any] | None
_REF_TEXT = re.compile(r"^[a-z][a-z0-9_\-]*://")
_MODEL_PREFIX = "model/"


def _settings(settings: SettingsLike) -> Settings:
    if isinstance(settings, Settings):
        return settings
    return load_settings(settings)


# --------------------------------------------------------------------------- resolving, with caches


class _Resolver:
    """Resolve many references, listing each run once (a lineage walk visits a run many times)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: dict[tuple[str, tuple[tuple[str, str], ...]], Backend] = {}
        self._runs: dict[tuple[str, tuple[tuple[str, str], ...], str], tuple[RunInfo, list[Stored]]] = {}

    def backend(self, ref: Ref) -> Backend:
        key = (ref.backend, ref.params)
        if key not in self._backends:
            self._backends[key] = open_backend(ref.backend, self.settings, ref)
        return self._backends[key]

    def run(self, ref: str | Ref) -> tuple[Backend, RunInfo, list[Stored], Ref]:
        """The run a reference points into, its checkpoints (oldest first), and the canonical ref."""
        parsed = parse_ref(ref)
        backend = self.backend(parsed)
        canonical = canonical_ref(backend, parsed)  # logged-model / registry refs -> <run>:vN
        key = (canonical.backend, canonical.params, canonical.path)
        if key not in self._runs:
            info = backend.find_run(canonical)
            self._runs[key] = (info, sorted(backend.list(info), key=lambda s: s.version))
        info, stored = self._runs[key]
        return backend, info, stored, canonical

    def resolve(self, ref: str | Ref) -> Resolved:
        backend, info, stored, canonical = self.run(ref)
        return Resolved(backend, info, select(stored, canonical))


def _fetch_verified(found: Resolved) -> LocalCheckpoint:
    """The checkpoint on local disk, every file re-hashed against its manifest first."""
    ckpt = found.fetch()
    return LocalCheckpoint(ckpt.path, verify(ckpt.path))


def _ref_key(ref: Ref) -> tuple[str, str]:
    return ref.backend, ref.path


# --------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class LineageNode:
    """One checkpoint on the way from a reference back to its root.

    ``via`` says how it continues to the next node: ``"parent"`` (the previous
    checkpoint of a run), ``"resumed_from"`` (a resume, possibly from another run
    or backend) or None at the root.  A node whose checkpoint no longer exists
    (deleted by retention, an unreachable tracker) has ``stored=None`` and ``error``.
    """

    ref: str
    stored: Stored | None
    lineage: Mapping[str, Any] = field(default_factory=dict)
    via: Literal["parent", "resumed_from"] | None = None
    error: str | None = None

    @property
    def parent(self) -> str | None:
        value = self.lineage.get("parent")
        return str(value) if value else None

    @property
    def resumed_from(self) -> str | None:
        value = self.lineage.get("resumed_from")
        return str(value) if value else None

    @property
    def logged_by(self) -> str | None:
        """The run that logged this checkpoint, when it is not the run holding it (a copy)."""
        run = self.lineage.get("run")
        if not run or self.stored is None:
            return None
        try:
            origin = Ref.parse(str(run))
        except InvalidRef:
            return str(run)
        return None if _ref_key(origin) == _ref_key(self.stored.run.ref) else str(run)

    def to_json(self) -> dict[str, Any]:
        s = self.stored
        return {
            "ref": self.ref,
            "missing": s is None,
            "error": self.error,
            "run": None if s is None else str(s.run.ref),
            "run_name": None if s is None else s.run.name,
            "backend": None if s is None else s.run.backend,
            "version": None if s is None else s.version,
            "step": None if s is None else s.step,
            "epoch": None if s is None else s.epoch,
            "aliases": [] if s is None else list(s.aliases),
            "metrics": {} if s is None else dict(s.metrics),
            "created": None if s is None else s.created,
            "parent": self.parent,
            "resumed_from": self.resumed_from,
            "averaged_from": list(self.lineage.get("averaged_from") or []),
            "logged_by": self.logged_by,
            "via": self.via,
        }


def _lineage_of(found: Resolved) -> Mapping[str, Any]:
    """The manifest's lineage.  Trackers mirror it in their metadata; where that mirror
    has no ``parent`` key (MLflow leaves empty tags out), read the manifest itself."""
    if "parent" in found.stored.lineage:
        return found.stored.lineage
    return _fetch_verified(found).manifest.lineage


def lineage(ref: str | Ref, *, settings: SettingsLike = None, max_depth: int = 100_000) -> list[LineageNode]:
    """The chain from the checkpoint ``ref`` selects back to its root, following
    ``parent`` (and so ``resumed_from``) across runs and backends.

    The first node is ``ref`` itself.  A parent that cannot be found ends the chain
    with a node that has ``stored=None``; the reference itself must exist.

    >>> [n.ref for n in lineage("local://p/run-b@latest")]  # doctest: +SKIP
    ['local://p/run-b:v2', 'local://p/run-b:v1', 'local://p/run-a:v2', 'local://p/run-a:v1']
    """
    resolver = _Resolver(_settings(settings))
    nodes: list[LineageNode] = []
    seen: set[tuple[str, str, int]] = set()
    found = resolver.resolve(ref)
    while True:
        data = _lineage_of(found)
        parent = data.get("parent") or None
        via: Literal["parent", "resumed_from"] | None = None
        if parent is not None:
            via = "resumed_from" if parent == data.get("resumed_from") else "parent"
        nodes.append(LineageNode(str(found.stored.ref), found.stored, data, via))
        seen.add((*_ref_key(found.stored.ref), found.stored.version))
        if parent is None:
            return nodes
        if len(nodes) >= max_depth:
            nodes.append(LineageNode(str(parent), None, {}, None, f"stopped after {max_depth} checkpoints"))
            return nodes
        try:
            found = resolver.resolve(str(parent))
        except CkptTrackError as exc:  # deleted by retention, a tracker out of reach: the chain ends here
            nodes.append(LineageNode(str(parent), None, {}, None, str(exc).splitlines()[0]))
            return nodes
        if (*_ref_key(found.stored.ref), found.stored.version) in seen:  # a damaged or hand-edited manifest
            nodes.append(LineageNode(str(found.stored.ref), None, {}, None, "lineage loops back to this checkpoint"))
            return nodes


# --------------------------------------------------------------------------- diff


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


class _TensorReader:
    """Tensors of a verified checkpoint, read one at a time (two whole checkpoints may not fit in memory)."""

    def __init__(self, ckpt: LocalCheckpoint, stack: contextlib.ExitStack) -> None:
        self.path = ckpt.path
        self.where: dict[str, Any] = {}
        for fname in tensor_files(ckpt.manifest):
            if Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise IntegrityError(f"{ckpt.path}: manifest entry {fname!r} escapes the checkpoint directory")
            try:
                handle = stack.enter_context(safe_open(str(ckpt.path / fname), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise IntegrityError(f"{ckpt.path / fname}: cannot read safetensors file ({exc})") from exc
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self.where[name] = handle

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / STATE).read_bytes())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{self.path / STATE}: cannot read ({exc})") from exc
        if not isinstance(data, dict):
            raise IntegrityError(f"{self.path / STATE}: not a JSON object")
        return data


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex) so differences of low-precision tensors are exact."""
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # byte comparison: torch.equal says NaN != NaN, and a restore must reproduce the bits
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                              b.reshape(-1).contiguous().view(torch.uint8))


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDelta:
    common = {"shape_a": tuple(a.shape), "shape_b": tuple(b.shape), "dtype_a": str(a.dtype).removeprefix("torch."),
              "dtype_b": str(b.dtype).removeprefix("torch.")}
    if a.shape != b.shape:
        return TensorDelta(name, "shape", **common)
    if _bits_equal(a, b):
        return TensorDelta(name, "unchanged", **common)
    if a.numel() == 0:
        return TensorDelta(name, "changed", **common, max_abs=0.0, rel_l2=0.0)
    wa, wb = _wide(a), _wide(b)
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
    resolver = _Resolver(_settings(settings))
    found_a, found_b = resolver.resolve(a), resolver.resolve(b)
    ckpt_a, ckpt_b = _fetch_verified(found_a), _fetch_verified(found_b)
    ma, mb = ckpt_a.manifest.metrics, ckpt_b.manifest.metrics
    metrics = tuple(MetricDelta(n, ma.get(n), mb.get(n)) for n in sorted(set(ma) | set(mb)))
    deltas: list[TensorDelta] = []
    with contextlib.ExitStack() as stack:
        ra, rb = _TensorReader(ckpt_a, stack), _TensorReader(ckpt_b, stack)
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


# --------------------------------------------------------------------------- gc


@dataclass(frozen=True)
class GcResult:
    """What retention decided for a run: ``planned`` versions to delete, ``kept`` the rest.
    ``deleted`` equals ``planned`` after a real run and is empty after a dry run."""

    run: RunInfo
    retention: Retention
    planned: tuple[Stored, ...]
    kept: tuple[Stored, ...]
    deleted: tuple[Stored, ...]
    dry_run: bool


def _retention(settings: Settings, keep_last: int | None, keep_best: int | None, keep_every: int | None,
               metric: str | None, mode: str | None) -> Retention:
    """Explicit rules replace the configured ``[retention]`` ones; metric and mode fall back
    to ``[retention]``, then to ``monitor`` / ``mode``."""
    configured = settings.retention
    explicit = any(v is not None for v in (keep_last, keep_best, keep_every))
    if mode is not None and mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    rules = (keep_last, keep_best, keep_every) if explicit else (
        configured.keep_last, configured.keep_best, configured.keep_every)
    for label, value in zip(("keep_last", "keep_best", "keep_every"), rules):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    retention = Retention(
        keep_last=rules[0], keep_best=rules[1], keep_every=rules[2],
        metric=metric or configured.metric or settings.monitor,
        mode=mode or configured.mode or settings.mode,
    )
    if not retention.enabled():
        raise ConfigError("no retention rule: give keep_last, keep_best or keep_every (--keep-last N, "
                          "--keep-best K, --keep-every S), or set them in [retention] of ckpt_track.toml")
    if retention.keep_best and not retention.metric:
        raise ConfigError("keep_best needs a metric to rank by: give --metric NAME or set monitor")
    return retention


def gc(
    ref: str | Ref,
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    keep_every: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
    dry_run: bool = False,
    settings: SettingsLike = None,
) -> GcResult:
    """Apply retention to a run on any backend: delete every version that no rule keeps.

    Never deletes a version holding ``latest``, ``best`` or a user alias.  Without any
    ``keep_*`` argument the configured ``[retention]`` rules apply; with one, only the
    given ones.  ``dry_run`` deletes nothing and returns the plan.

    >>> gc("local://p/r", keep_last=3, keep_best=1, metric="val/loss", dry_run=True).planned  # doctest: +SKIP
    """
    s = _settings(settings)
    retention = _retention(s, keep_last, keep_best, keep_every, metric, mode)
    backend, info, stored, _ = _Resolver(s).run(ref)
    if retention.keep_best and stored and not any(retention.metric in x.metrics for x in stored):
        # a misspelt metric would silently protect nothing
        known = sorted({m for x in stored for m in x.metrics})
        raise ConfigError(f"no checkpoint of {info.ref} records metric {retention.metric!r}, so keep_best "
                          f"cannot rank them; metrics there: {', '.join(known) or 'none'}")
    plan = retention_plan(stored, retention, retention.metric, retention.mode or s.mode)
    protected = [x for x in plan if any(a in PROTECTED_ALIASES or not a.startswith("step-") for a in x.aliases)]
    if protected:  # policy guarantees this; deleting an aliased version is unrecoverable, so check again
        raise CkptTrackError(f"retention planned to delete aliased versions {[str(x.ref) for x in protected]}")
    doomed = {x.version for x in plan}
    kept = tuple(x for x in stored if x.version not in doomed)
    if plan and not dry_run and "delete" not in getattr(backend, "capabilities", frozenset()):
        raise BackendError(f"the {backend.name} backend cannot delete checkpoints, so gc cannot apply retention")
    deleted: list[Stored] = []
    if not dry_run:
        for x in plan:
            backend.delete(x)
            deleted.append(x)
    return GcResult(info, retention, tuple(plan), kept, tuple(deleted), dry_run)


# --------------------------------------------------------------------------- copy


def open_target(target: str | Ref, settings: SettingsLike = None) -> tuple[Backend, RunInfo]:
    """Open (attach to or create) the run a copy target names; see the module docstring
    for the grammar.  The caller calls ``backend.finish_run(run)`` when done."""
    s = _settings(settings)
    ref = parse_ref(target)
    if ref.selector:
        raise ConfigError(f"target {ref} names a checkpoint; name a run instead (drop {ref.selector!r})")
    backend = open_backend(ref.backend, s, ref)
    canonical = canonical_ref(backend, ref)
    if canonical.selector:
        raise ConfigError(f"target {ref} names a checkpoint, not a run")
    try:
        found = backend.find_run(canonical)
    except (CheckpointNotFound, InvalidRef) as exc:
        segs = canonical.segments
        if len(segs) != 2:
            raise ConfigError(
                f"target {ref} is not an existing run; to create one write {ref.backend}://<project>/<run name> "
                f"(for MLflow the project is the experiment) ({str(exc).splitlines()[0]})"
            ) from exc
        project, name = segs
        can_choose = "choose_run_id" in getattr(backend, "capabilities", frozenset())
        spec = RunSpec(project=project, name=name, run_id=name if can_choose else None, resume="auto")
        run = backend.open_run(spec)
        if run.project != project:
            warnings.warn(f"target {ref}: the {backend.name} settings put the run in project {run.project!r}, "
                          f"not {project!r}; add the backend's project option to the target (?key=value) to "
                          "override them", UserWarning, stacklevel=2)
        return backend, run
    return backend, backend.open_run(RunSpec(project=found.project, name=found.name, run_id=found.run_id,
                                             resume="must"))


@dataclass(frozen=True)
class CopyResult:
    """``copied`` and ``skipped`` pair each source version with its version in the target;
    a skipped one was already there (same step, creation time and size)."""

    source: RunInfo
    target: RunInfo
    copied: tuple[tuple[Stored, Stored], ...]
    skipped: tuple[tuple[Stored, Stored], ...]


def _identity(s: Stored) -> tuple[int, str, int]:
    return s.step, s.created, s.size


def copy(
    ref: str | Ref,
    to: str | Ref,
    *,
    settings: SettingsLike = None,
    progress: Callable[[int, int, Stored], None] | None = None,
) -> CopyResult:
    """Copy one checkpoint (``ref`` with a selector) or a whole run (no selector: every
    version, oldest first) into the run ``to`` names, on any backend.

    Steps, metrics, the source's aliases and the manifest (so lineage) travel unchanged;
    files are verified before they are sent.  Versions already in the target are skipped,
    so an interrupted copy can simply be run again.  ``progress(done, total, stored)`` is
    called before each source version is handled.

    >>> copy("mlflow://0f1e2d3c4b5a69788796a5b4c3d2e1f0", "local://resnet/mirror")  # doctest: +SKIP
    """
    s = _settings(settings)
    resolver = _Resolver(s)
    src_backend, src_run, src_all, canonical = resolver.run(ref)
    chosen = [select(src_all, canonical)] if canonical.selector else list(src_all)
    if not chosen:
        raise CheckpointNotFound(f"{src_run.ref} has no committed checkpoints to copy")
    backend, target = open_target(to, s)
    copied: list[tuple[Stored, Stored]] = []
    skipped: list[tuple[Stored, Stored]] = []
    try:
        present = {_identity(x): x for x in backend.list(target)}
        for done, src in enumerate(chosen):
            if progress is not None:
                progress(done, len(chosen), src)
            there = present.get(_identity(src))
            if there is not None:
                if src.aliases:
                    backend.set_aliases(there, src.aliases)
                skipped.append((src, there))
                continue
            ckpt = _fetch_verified(Resolved(src_backend, src_run, src))
            stored = backend.put(target, ckpt, src.aliases)
            present[_identity(stored)] = stored
            copied.append((src, stored))
    finally:
        backend.finish_run(target)
    return CopyResult(src_run, target, tuple(copied), tuple(skipped))


# --------------------------------------------------------------------------- average


@dataclass(frozen=True)
class AverageResult:
    """The averaged checkpoint: on disk (``path``) or logged to a run (``stored``)."""

    sources: tuple[str, ...]  # canonical references, in the order given
    step: int
    averaged: tuple[str, ...]  # tensor names averaged
    taken: tuple[str, ...]  # non-float tensor names taken from the first checkpoint
    path: Path | None = None
    stored: Stored | None = None


def _model_tensors(ckpt: LocalCheckpoint, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The model subtree of ``state.json`` and the ``model/*`` tensors, nothing else (optimizer
    state can be several times the model's size)."""
    with contextlib.ExitStack() as stack:
        reader = _TensorReader(ckpt, stack)
        state = reader.state()
        if not isinstance(state.get("model"), dict):
            raise StateMismatch(f"{where} holds no model state (it was saved without model=...)")
        tensors = {n: reader.get(n) for n in sorted(reader.names()) if n.startswith(_MODEL_PREFIX)}
    return state, tensors


def _mismatch(names: Iterable[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:10]) + (f" (+{len(shown) - 10} more)" if len(shown) > 10 else "")


def _average_tensors(
    loaded: Iterator[tuple[str, dict[str, torch.Tensor]]], non_float: Literal["equal", "first"]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    first_where, first = next(loaded)
    floating = sorted(n for n, t in first.items() if t.is_floating_point() or t.is_complex())
    sums = {n: _wide(first[n]) for n in floating}
    count = 1
    for where, tensors in loaded:
        if set(tensors) != set(first):
            raise StateMismatch(
                f"{where} does not hold the same model tensors as {first_where}: "
                f"only in {first_where}: {_mismatch(set(first) - set(tensors)) or '-'}; "
                f"only in {where}: {_mismatch(set(tensors) - set(first)) or '-'}"
            )
        bad = [f"{n}: {tuple(t.shape)} {t.dtype} vs {tuple(first[n].shape)} {first[n].dtype}"
               for n, t in sorted(tensors.items()) if t.shape != first[n].shape or t.dtype != first[n].dtype]
        if bad:
            raise StateMismatch(f"{where} and {first_where} differ in shape or dtype: {_mismatch(bad)}")
        if non_float == "equal":
            unequal = [n for n in first if n not in sums and not _bits_equal(first[n], tensors[n])]
            if unequal:
                raise StateMismatch(
                    f"non-float tensors differ between {first_where} and {where}: {_mismatch(unequal)}; they "
                    "cannot be averaged (pass non_float='first' / --non-float first to take them from the first)"
                )
        for n in floating:
            sums[n] += _wide(tensors[n])
        count += 1
    out = {n: first[n].clone() for n in first if n not in sums}
    out.update({n: (sums[n] / count).to(first[n].dtype).contiguous() for n in floating})
    taken = tuple(sorted(n for n in first if n not in sums))
    return out, tuple(floating), taken


def average(
    refs: Sequence[str | Ref],
    output: str | os.PathLike[str],
    *,
    aliases: Sequence[str] = (),
    non_float: Literal["equal", "first"] = "equal",
    settings: SettingsLike = None,
) -> AverageResult:
    """Average the model weights of several checkpoints (element-wise mean of the floating
    ``model/*`` tensors, computed in float64 and stored in each tensor's dtype).

    Non-float tensors (integer buffers) are taken from the first checkpoint; with
    ``non_float="equal"`` they must be equal in all of them.  The result holds the model
    only (no optimizer, scheduler or RNG: they do not belong to averaged weights), the
    step and epoch of the newest source, no metrics, and lineage ``averaged_from``.

    ``output`` is a directory (new or empty) or a run reference (see :func:`open_target`).
    Logged into a new run it gets ``latest`` and ``step-N``; into an existing run it moves
    no alias but ``aliases``, so that run's ``latest`` (what resumes use) stays where it is.

    >>> average(["local://p/r:v8", "local://p/r:v9", "local://p/r:v10"], "./swa")  # doctest: +SKIP
    """
    if non_float not in ("equal", "first"):
        raise ConfigError(f"non_float must be 'equal' or 'first', got {non_float!r}")
    if len(refs) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(refs)}")
    for a in aliases:
        Ref("x", alias=a)  # validates the characters
    s = _settings(settings)
    resolver = _Resolver(s)
    found = [resolver.resolve(r) for r in refs]
    sources = tuple(str(f.stored.ref) for f in found)
    newest = max(found, key=lambda f: f.stored.step)  # max() keeps the first of equal steps
    out_text = os.fspath(output)
    to_run = bool(_REF_TEXT.match(out_text))
    dest: Path | None = None
    if not to_run:
        dest = Path(out_text).expanduser().absolute()
        if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
            raise ConfigError(f"{dest} exists and is not an empty directory; pick a new or empty output")

    trees: list[tuple[str, dict[str, Any]]] = []

    def load_all() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for f in found:  # one checkpoint's model in memory at a time, plus the running sums
            where = str(f.stored.ref)
            state, tensors = _model_tensors(_fetch_verified(f), where)
            trees.append((where, state["model"]))
            yield where, tensors

    tensors, averaged, taken = _average_tensors(load_all(), non_float)
    first_where, model_tree = trees[0]
    for where, tree in trees[1:]:
        if tree != model_tree:  # same tensor names but other keys or non-tensor entries
            keys = {k for k in set(tree) | set(model_tree) if tree.get(k) != model_tree.get(k)}
            raise StateMismatch(f"the model state of {where} differs from {first_where} in {_mismatch(keys)}")
    step, epoch = newest.stored.step, newest.stored.epoch
    tree = {"step": step, "epoch": epoch, "model": model_tree}
    lineage_info: dict[str, Any] = {
        "parent": str(newest.stored.ref), "resumed_from": None, "averaged_from": list(sources),
        "git": _lineage.git_info(), **_lineage.environment(),
    }
    if dest is not None:
        if dest.exists():
            dest.rmdir()  # empty: write_checkpoint publishes by renaming onto a fresh name
        ckpt = write_checkpoint(dest.parent, dest.name, tensors, tree, step=step, epoch=epoch,
                                lineage=lineage_info, shard_size=s.shard_size)
        return AverageResult(sources, step, averaged, taken, path=ckpt.path)
    backend, target = open_target(out_text, s)
    try:
        fresh = not backend.list(target)
        lineage_info["run"] = str(target.ref)
        with tempfile.TemporaryDirectory(prefix="ckpt-track-average-") as tmp:
            ckpt = write_checkpoint(Path(tmp), "averaged", tensors, tree, step=step, epoch=epoch,
                                    lineage=lineage_info, shard_size=s.shard_size)
            names = [*(["latest", f"step-{step}"] if fresh else []), *aliases]
            stored = backend.put(target, ckpt, list(dict.fromkeys(names)))
    finally:
        backend.finish_run(target)
    return AverageResult(sources, step, averaged, taken, stored=stored)
