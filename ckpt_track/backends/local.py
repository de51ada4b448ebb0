"""The embedded ``local`` backend: a store directory that needs no server.

Layout (``root`` defaults to ``./ckpt_runs``)::

    <root>/<project>/<run_id>/run.json             name, created, training config
    <root>/<project>/<run_id>/aliases.json         {"latest": 3, "best": 2, "step-500": 1}
    <root>/<project>/<run_id>/checkpoints/v000003/ one committed checkpoint (format v1)

The store itself is :class:`ckpt_track.backends._store.DirStore` (shared with the offline modes
of W&B and Comet); this module maps the Protocol onto it.  A ``root`` that is an fsspec URL
(``s3://bucket/prefix``, ``gs://``, ...) selects :class:`ckpt_track.objstore.ObjectStore`
instead, with the same runs, versions and aliases (its layout is described there).  Version numbers are allocated and
aliases moved under a per-run file lock, so several processes can write to one store without
clobbering each other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from .. import cache
from ..config import DEFAULT_ROOT  # the core owns it: the spool lives under the same root
from ..errors import CheckpointNotFound, ConfigError, InvalidRef
from ..format import LocalCheckpoint
from ..objstore import ObjectProjects, ObjectStore, is_url, storage_options
from ..options import option_names, parse_options
from ..plan import by_name, check_segment, resume_decision
from ..records import Capability, RunInfo, RunSpec, Stored
from ..refs import Ref
from ._store import DirStore, Version, new_run_id

__all__ = ["DEFAULT_ROOT", "LocalBackend", "LocalHandle"]

_NAME_MAX = 255  # bytes of one file name (ext4, APFS, NTFS)
_ROOT_MAX = 3400  # bytes: room under PATH_MAX (4096) for <project>/<run>/checkpoints/v000001/<file>
_FIX = "free disk space or set [local] root to a larger disk"


@dataclass(frozen=True)
class LocalOptions:
    root: str | None = None
    #: the ``[storage]`` section (fsspec options for a URL root), passed on by the core
    storage: Any = None


@dataclass(frozen=True)
class LocalHandle:
    """Where a run or a version lives in the store."""

    path: str


def _root(value: Any) -> Path:
    """The store directory from the ``root`` option (or ``?root=``), refused up front when no file
    system could hold it, so that a mistyped value is a ConfigError and never ENAMETOOLONG."""
    text = str(value).removeprefix("file://")  # the URL form of a local directory
    why = "holds a NUL character" if "\0" in text else ""
    path = Path(text.replace("\0", "")).expanduser().absolute()
    if not why and any(len(os.fsencode(part)) > _NAME_MAX for part in path.parts):
        why = f"has a name longer than {_NAME_MAX} bytes"
    elif not why and len(os.fsencode(str(path))) > _ROOT_MAX:
        why = f"is longer than {_ROOT_MAX} bytes"
    if why:
        shown = text if len(text) <= 80 else f"{text[:80]}..."
        raise ConfigError(f"local backend: root {shown!r} {why}; set [local] root (or ?root=) to a directory")
    return path


class LocalBackend:
    """Checkpoints in a directory tree; the default backend."""

    name: ClassVar[str] = "local"
    options: ClassVar[frozenset[str]] = option_names(LocalOptions) - {"storage"}  # storage: set by the core
    #: the core passes the ``[storage]`` section as the ``storage`` option (fsspec options of a URL root)
    uses_storage: ClassVar[bool] = True
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {Capability.DELETE, Capability.CONCURRENT_WRITERS, Capability.CHOOSE_RUN_ID, Capability.DEDUP})

    def __init__(self, options: Any = None) -> None:
        opts = parse_options(LocalOptions, options, backend=self.name)
        self.remote = bool(opts.root) and is_url(str(opts.root))
        self.store: Any
        if self.remote:
            self.root: Any = str(opts.root).rstrip("/")
            self.store = ObjectProjects(ObjectStore(self.root, storage_options(opts.storage),
                                                    part_size=dict(opts.storage or {}).get("part_size")))
            # versions are claimed create-only, but alias tables are read-modify-write objects
            self.capabilities = self.capabilities - {Capability.CONCURRENT_WRITERS}
        else:
            self.root = _root(opts.root or DEFAULT_ROOT)
            self.store = DirStore(self.root, fix=_FIX)
        self._damaged: dict[str, dict[int, tuple[tuple[str, ...], str]]] = {}

    def _rdir(self, run: RunInfo) -> Any:  # RunDir, or ObjectRun for a URL root
        return self.store.run(run.project, run.run_id)

    def _info(self, project: str, run_id: str, resumed: bool, meta: Any = None) -> RunInfo:
        rdir = self.store.run(project, run_id)
        meta = rdir.meta() if meta is None else meta
        return RunInfo(
            backend=self.name, project=project, run_id=run_id, name=str(meta.get("name", run_id)),
            ref=Ref(self.name, f"{project}/{run_id}"), resumed=resumed, native=LocalHandle(str(rdir.path)),
        )

    def run_config(self, run: RunInfo) -> dict[str, Any]:
        """The config the run was opened with (``ct.init(config=...)``, kept in ``run.json``)."""
        return dict(self._rdir(run).meta().get("config") or {})

    # -- listing (``ckpt-track projects`` / ``runs``) ------------------------------------
    def list_projects(self) -> list[str]:
        """The projects in the store that hold at least one run, by name."""
        if self.remote:
            self.store.check()
        return list(self.store.projects())

    def list_runs(self, project: str) -> list[RunInfo]:
        """Every run of ``project``, oldest first, each as :meth:`find_run` returns it (a run
        with no committed checkpoint yet too: every run in the store is ckpt_track's).
        ``CheckpointNotFound`` names an unknown project and lists the known ones."""
        known = self.list_projects()
        if project not in known:
            raise CheckpointNotFound(
                f"no project {project!r} under {self.root}; projects there: {', '.join(known) or 'none'} "
                f"(set [local] root, or ?root=, if the store is elsewhere)")
        return [self._info(project, rid, resumed=True, meta=meta) for rid, meta in self.store.runs(project)]

    # -- runs -------------------------------------------------------------------------
    def open_run(self, spec: RunSpec) -> RunInfo:
        if self.remote:
            self.store.check()
        with self.store.lock_project(spec.project):
            if spec.run_id is not None:
                check_segment(spec.run_id, "run id")
                found: str | None = spec.run_id if self.store.run(spec.project, spec.run_id).exists() else None
            else:
                found = self.store.named(spec.project, spec.name) if by_name(spec) else None
            wanted = spec.run_id or spec.name or ""
            decision = resume_decision(
                spec, found is not None, what=f"run {found!r} in project {spec.project!r}",
                missing=lambda: self._no_run_message(spec.project, wanted))
            if decision == "attach":
                assert found is not None
                return self._info(spec.project, found, resumed=True)
            meta = {"name": spec.name or spec.run_id, "config": dict(spec.config)}
            rdir = (self.store.create(spec.project, spec.run_id, meta, new_run_id) if self.remote
                    else self.store.create(spec.project, spec.run_id, meta))
            return self._info(spec.project, str(rdir.path).rsplit("/", 1)[-1], resumed=False)

    def _no_run_message(self, project: str, wanted: str) -> str:
        return f"no run {wanted!r} in project {project!r} under {self.root}; runs there: {self.store.describe(project)}"

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) != 2:
            raise InvalidRef(f"{ref}: a local reference names a project and a run: local://<project>/<run>")
        project, wanted = segs
        if self.remote:
            self.store.check()
        found = self.store.find(project, wanted)
        if found is None:
            raise CheckpointNotFound(self._no_run_message(project, wanted))
        return self._info(project, found, resumed=True)

    # -- checkpoints --------------------------------------------------------------------
    def _stored(self, run: RunInfo, v: Version) -> Stored:
        m = v.manifest
        return Stored(
            ref=run.ref.select(version=v.number), run=run, version=v.number, step=m.step, epoch=m.epoch,
            aliases=v.aliases, metrics=dict(m.metrics), size=m.size, created=m.created,
            lineage=dict(m.lineage), native=LocalHandle(str(v.path)),
        )

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        version, copied = self._rdir(run).add(ckpt, aliases)
        return replace(self._stored(run, version), uploaded=copied)

    def sweep(self, run: RunInfo) -> None:
        """Remove what killed writers of ``run`` left (see ``RunDir.sweep``)."""
        self._rdir(run).sweep()

    def list(self, run: RunInfo) -> list[Stored]:
        versions, damaged = self._rdir(run).read()
        self._damaged[str(self._rdir(run).path)] = damaged
        return [self._stored(run, v) for v in versions]

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """Versions of ``run`` whose manifest is damaged (left out of :meth:`list`): version ->
        (the aliases pointing at it, what is wrong)."""
        key = str(self._rdir(run).path)
        if key not in self._damaged:
            self.list(run)
        return dict(self._damaged[key])

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        if self.remote:  # download into the cache; restore verifies every byte against the manifest
            rdir, number = self._rdir(stored.run), stored.version
            return cache.fetch(Path(dest), own=lambda into: rdir.fetch_into(number, into),
                               blobs=lambda names, into: rdir.fetch_into(number, into, names),
                               where=str(stored.ref))
        return self.store.storage.open_checkpoint(Path(stored.native.path))  # already on local disk: no copy

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        self._rdir(stored.run).point(aliases, stored.version)

    def delete(self, stored: Stored) -> None:
        self._rdir(stored.run).remove(stored.version)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        def add(meta: dict[str, Any]) -> dict[str, Any]:
            inputs = list(meta.get("inputs", []))
            return {**meta, "inputs": inputs if str(source.ref) in inputs else [*inputs, str(source.ref)]}

        self._rdir(run).update_meta(add)

    def finish_run(self, run: RunInfo) -> None:
        return None  # nothing to close: every write is already durable

    # -- references ---------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return None  # the canonical local://<project>/<run> form is parsed by the core

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return ("local://<project>/<run id or name>[@selector][?root=/path/to/store]",)
