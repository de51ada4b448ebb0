"""Offline (``[comet] online = false``): ``OfflineExperiment`` writes ``<key>.zip`` for
``comet upload``, and every checkpoint is also kept in the shared local store
(:mod:`ckpt_track.backends._store`), so any process can restore it at once, also after a crash
that never wrote the zip.  Layout, one store run per experiment key::

    <offline_directory>/ckpt_track/<key>/run.json        key, workspace, project, name, run id,
                                                        config, inputs, last_version, deleted
    <offline_directory>/ckpt_track/<key>/aliases.json    {"latest": 3, "best": 2}
    <offline_directory>/ckpt_track/<key>/v000003/        one committed checkpoint (format v1)

Version numbers and aliases come from the store (under its per-run lock); each change is also
logged into the archive as the ``ckpt_track.state`` other, so that the uploaded experiment
lists the same checkpoints.  A store written by an earlier release (``state.json`` beside the
versions) is taken over on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ...errors import BackendError, CheckpointNotFound
from ...format import LocalCheckpoint, now_iso
from ...records import RunInfo, Stored
from .._store import DirStore, RunDir
from .handles import STATE_KEY, AliasState, CometCopy, Found, checkpoint_meta
from .handles import stored as make_stored
from .mode import Mode
from .model_registry import ModelRegistry
from .refs import model_name
from .sdk import CometSdk
from .upload import blobs_to_send, log_checkpoint, register, uploaded_bytes

__all__ = ["OfflineMode"]

_RUNS = "ckpt_track"  # the store's one "project": <offline_directory>/ckpt_track/<key>
_FIX = "free disk space or set [comet] offline_directory to a larger disk"


def _tombstoned(rdir: RunDir, version: int) -> dict[str, Any]:
    """``run.json`` with ``version`` among the deleted ones (and never given out again)."""
    def change(meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, "last_version": max(rdir.high_water(meta), version),
                "deleted": sorted({*map(int, meta.get("deleted", [])), version})}

    return rdir.update_meta(change)


def _take_over_legacy(rdir: RunDir) -> None:
    """An earlier release kept the alias table, high-water mark and tombstones in ``state.json``;
    move them to ``aliases.json`` and ``run.json`` (``state.json`` stays, for that release)."""
    legacy = rdir.path / "state.json"
    if not legacy.is_file() or (rdir.path / "aliases.json").is_file():
        return
    old = AliasState.load(rdir.storage.read_json(legacy), str(legacy))
    for version in old.deleted:
        _tombstoned(rdir, version)
    rdir.update_meta(lambda m: {**m, "last_version": max(rdir.high_water(m), old.last_version)})
    by_version: dict[int, list[str]] = {}
    for alias, version in old.aliases.items():
        by_version.setdefault(version, []).append(alias)
    for version, names in sorted(by_version.items()):
        rdir.point(names, version)
    rdir.point([], 0)  # writes aliases.json also when the table is empty: taken over once


class OfflineMode(Mode):
    """Checkpoints in the local store, mirrored into the Comet offline archive."""

    online: ClassVar[bool] = False

    def __init__(self, sdk: CometSdk, directory: Path) -> None:
        super().__init__()
        self.sdk = sdk
        self.directory = directory
        self.store = DirStore(directory, checkpoints="", fix=_FIX)

    def _rdir(self, key: str) -> RunDir:
        return self.store.run(_RUNS, key)

    def _state(self, rdir: RunDir) -> AliasState:
        """The ``ckpt_track.state`` other the archive gets: the store's tables."""
        meta = rdir.meta()
        return AliasState(rdir.aliases(), rdir.high_water(meta), sorted(int(v) for v in meta.get("deleted", [])))

    # -- experiments ----------------------------------------------------------------------
    def by_key(self, key: str) -> Found | None:
        rdir = self._rdir(key)
        if not rdir.exists():
            return None
        _take_over_legacy(rdir)
        m = rdir.meta()
        return Found(key, m.get("workspace"), m["project"], m.get("name"), m.get("run_id"))

    def by_name(self, project: str, name: str, workspace: str | None = None) -> Found | None:
        hits = [key for key, m in self.store.runs(_RUNS) if m.get("project") == project and m.get("name") == name]
        return self.by_key(hits[-1]) if hits else None  # runs() is oldest first

    def list_projects(self) -> list[str]:
        """The projects of the experiments in the offline store."""
        return sorted({str(m["project"]) for _, m in self.store.runs(_RUNS) if m.get("project")})

    def list_runs(self, project: str) -> list[Found]:
        """The experiments of ``project`` in the offline store, oldest first."""
        found = [f for key, m in self.store.runs(_RUNS) if m.get("project") == project
                 and (f := self.by_key(key)) is not None]
        if not found:
            known = ", ".join(self.list_projects()) or "none"
            raise CheckpointNotFound(f"no Comet project {project!r} in the offline store {self.directory} "
                                     f"(projects: {known})")
        return found

    def not_found(self, wanted: str, project: str | None) -> str:
        return f"no Comet experiment {wanted!r} in project {project!r} in the offline store {self.directory}"

    def experiment(self, comet_ml: Any, found: Found, create: bool) -> Any:
        cls = comet_ml.OfflineExperiment if create else comet_ml.ExistingOfflineExperiment
        return cls(workspace=found.workspace, project_name=found.project, experiment_key=found.key,
                   offline_directory=str(self.directory))

    def record_run(self, found: Found, config: Mapping[str, Any] | None) -> None:
        rdir = self._rdir(found.key)
        with rdir.lock():
            if not rdir.exists():
                rdir.write_meta({"key": found.key, "workspace": found.workspace, "project": found.project,
                                 "name": found.name, "run_id": found.run_id, "created": now_iso(),
                                 "config": dict(config or {})})

    def log_other(self, exp: Any | None, key: str, name: str, value: str) -> None:
        """Into the archive while the experiment is live; after the zip is written only the
        local store changes."""
        if exp is not None:
            with self.sdk.calling(f"logging {name} to experiment {key}"):
                exp.log_other(name, value)

    def registry(self) -> ModelRegistry:
        raise BackendError("registry references need Comet online: set [comet] online = true")

    def registry_version(self, name: str) -> str | None:
        return None  # Comet picks it when the archive is uploaded

    # -- checkpoints --------------------------------------------------------------------------
    def put(self, run: RunInfo, exp: Any, ckpt: LocalCheckpoint, aliases: Sequence[str],
            register_as: str | None) -> Stored:
        """The durable local copy first; it is logged into the archive (from the copy) under the
        store's lock, once its version number is known, and removed again if that fails."""
        key, m = run.native.key, ckpt.manifest
        rdir = self._rdir(key)
        held = self.held.setdefault(key, {})
        new_blobs = blobs_to_send(m, held)
        metas: list[dict[str, Any]] = []

        def commit(version: int, path: Path) -> None:
            meta = checkpoint_meta(version, ckpt, aliases, run.ref)
            name = model_name(version, m.step)
            state = self._state(rdir).point(aliases, version)
            with self.sdk.calling(f"logging checkpoint v{version} (step {m.step}) to experiment {key}"):
                log_checkpoint(exp, path, name, meta, m, new_blobs)
                if register_as:
                    register(exp, name, register_as, None, aliases, str(run.ref.select(version=version)))
                exp.log_other(STATE_KEY, state.dump())
            held.update({f: m.files[f].size for f in new_blobs})
            metas.append(meta)

        try:
            version, _ = rdir.add(ckpt, aliases, on_commit=commit)
        except BaseException:
            self.held.pop(key, None)  # unsure what the archive got: log them again
            raise
        native = CometCopy(model_name(version.number, m.step), key, str(version.path))
        return replace(make_stored(run, version.number, metas[0], version.aliases, native),
                       uploaded=uploaded_bytes(metas[0], new_blobs))

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """The store's versions whose manifest is damaged: a reference meaning one of them is
        refused by the core, never answered with another version."""
        rdir = self._rdir(run.native.key)
        deleted = set(self._state(rdir).deleted)
        return {v: d for v, d in rdir.read()[1].items() if v not in deleted}

    def list(self, run: RunInfo) -> list[Stored]:
        key = run.native.key
        rdir = self._rdir(key)
        deleted = set(self._state(rdir).deleted)  # tombstoned by a delete that did not finish
        versions, _ = rdir.read()
        out = []
        for v in versions:
            if v.number in deleted:
                continue
            m = v.manifest
            meta = {"step": m.step, "epoch": m.epoch, "metrics": m.metrics, "size": m.size, "created": m.created,
                    "lineage": m.lineage}
            out.append(make_stored(run, v.number, meta, v.aliases, CometCopy(model_name(v.number, m.step), key,
                                                                             str(v.path))))
        return out

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        return self.store.storage.open_checkpoint(Path(stored.native.path))  # already on local disk

    def set_aliases(self, stored: Stored, exp: Any | None, aliases: Sequence[str]) -> None:
        key = stored.run.native.key
        rdir = self._rdir(key)
        self.log_other(exp, key, STATE_KEY, self._state(rdir).point(aliases, stored.version).dump())
        rdir.point(aliases, stored.version)

    def delete(self, stored: Stored, exp: Any | None) -> None:
        """Tombstone (into the archive too: the uploaded files are never listed), then remove."""
        key = stored.run.native.key
        rdir = self._rdir(key)
        self.log_other(exp, key, STATE_KEY, self._state(rdir).tombstone(stored.version).dump())
        _tombstoned(rdir, stored.version)
        rdir.remove(stored.version)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        self._rdir(run.native.key).update_meta(lambda m: {**m, "inputs": [*m.get("inputs", []), str(source.ref)]})
