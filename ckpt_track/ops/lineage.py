"""The lineage tree: the chain from a checkpoint back to its root, following each manifest's
``parent`` (and so ``resumed_from``) across runs and backends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import CkptTrackError, InvalidRef
from ..records import Stored
from ..refs import Ref
from ..resolve import Resolved, Resolver
from ._common import SettingsLike, as_settings

__all__ = ["LineageNode", "lineage"]


def _ref_key(ref: Ref) -> tuple[str, str]:
    return ref.backend, ref.path


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
    return found.fetch_verified().manifest.lineage


def lineage(ref: str | Ref, *, settings: SettingsLike = None, max_depth: int = 100_000) -> list[LineageNode]:
    """The chain from the checkpoint ``ref`` selects back to its root, following
    ``parent`` (and so ``resumed_from``) across runs and backends.

    The first node is ``ref`` itself.  A parent that cannot be found ends the chain
    with a node that has ``stored=None``; the reference itself must exist.

    >>> [n.ref for n in lineage("local://p/run-b@latest")]  # doctest: +SKIP
    ['local://p/run-b:v2', 'local://p/run-b:v1', 'local://p/run-a:v2', 'local://p/run-a:v1']
    """
    resolver = Resolver(as_settings(settings), skip_damaged=True)
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
