"""``mode = "offline"`` and ``mode = "disabled"``: nothing can be read back from W&B, so the
checkpoints live in ckpt_track's local store next to the offline runs
(:class:`ckpt_track.backends._store.DirStore`, versions directly in the run directory)::

    <dir>/wandb/ckpt_track/<project>/<run id>/run.json       name, entity, config, resumed-from
    <dir>/wandb/ckpt_track/<project>/<run id>/aliases.json   the alias table
    <dir>/wandb/ckpt_track/<project>/<run id>/v000001/       the checkpoint files

Offline, the real SDK also writes the run and each checkpoint artifact to the ``.wandb`` record
log for a later ``wandb sync``; the artifact's entries point at the store's files in place.
Disabled keeps only the store and never calls W&B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...errors import CheckpointNotFound, IntegrityError
from ...format import MANIFEST, LocalCheckpoint, Manifest
from ...records import RunInfo, RunSpec, Stored
from .._store import DirStore, RunDir
from .common import Found, sent_bytes, to_stored
from .live import LiveRuns, live_run
from .refs import SEGMENT
from .sdk import Sdk

__all__ = ["DisabledMode", "OfflineMode"]

_FIX = "free disk space or set [wandb] dir to a larger disk"


def _metadata(m: Manifest) -> dict[str, Any]:
    """What the artifact metadata would hold, from the stored manifest."""
    return {"step": m.step, "epoch": m.epoch, "metrics": m.metrics, "created": m.created, "size": m.size,
            "lineage": m.lineage}


def _adopt_legacy_aliases(rdir: RunDir) -> None:
    """The previous release kept a run's alias table in ``run.json`` (``"aliases"``, next to
    ``"next_version"`` and ``"versions"``, the list of committed versions); the store keeps the
    table in ``aliases.json`` and takes every version directory on disk as committed.  Once per
    store: move the table, and put aside a directory that release never listed (a put or delete
    it was killed in), so that a store written by it reads the same."""
    table = rdir.path / "aliases.json"
    if table.exists() or not rdir.exists() or "versions" not in rdir.meta():
        return
    with rdir.lock():
        meta = rdir.meta()
        legacy, listed = meta.get("aliases") or {}, meta.get("versions")
        if table.exists() or not isinstance(legacy, dict) or not isinstance(listed, list):
            return
        try:
            aliases = {str(a): int(v) for a, v in legacy.items()}
            committed = {int(v) for v in listed}
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"{rdir.path / 'run.json'} is damaged: {exc}") from exc
        for number in set(rdir.numbers()) - committed:
            trash = rdir.storage.trash(rdir.version_path(number))
            if trash is not None:
                rdir.storage.remove_now(trash)
        rdir.storage.write_json(table, aliases, fix=rdir.fix)


class OfflineMode:
    """The local store is what ``list``/``get`` read; the record log is what ``wandb sync`` sends."""

    name = "offline"

    def __init__(self, sdk: Sdk, live: LiveRuns, *, directory: Path) -> None:
        self.sdk, self.live, self.directory = sdk, live, directory
        self.store = DirStore(directory / "wandb" / "ckpt_track", checkpoints="", fix=_FIX)

    def _rdir(self, project: str, run_id: str) -> RunDir:
        rdir = self.store.run(project, run_id)
        _adopt_legacy_aliases(rdir)
        return rdir

    # -- runs -------------------------------------------------------------------------------
    def entity_for(self, given: str | None) -> str | None:
        return given  # no server to ask for a default: a run without one is "the default entity"

    def lookup(self, entity: str | None, project: str, wanted: str, by_name: bool) -> Found | None:
        """(run id, name, entity) of a run in the store, by id or by name (newest)."""
        run_id = self.store.named(project, wanted) if by_name else wanted
        if run_id is None or not SEGMENT.match(run_id) or not self.store.run(project, run_id).exists():
            return None
        meta = self.store.run(project, run_id).meta()
        return run_id, str(meta.get("name") or run_id), str(meta.get("entity") or "")

    def start(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, resumed: bool) -> Any:
        return self.sdk.start(spec, entity, project, run_id, mode=self.name, directory=self.directory,
                              resume="allow" if resumed else None)

    def opened(self, project: str, run_id: str, entity: str | None, name: str | None,
               config: dict[str, Any]) -> None:
        """The run's directory in the store, created on first open; name and entity kept current."""
        with self.store.lock_project(project):
            if not self.store.run(project, run_id).exists():
                self.store.create(project, run_id, {"config": dict(config)})
        self._rdir(project, run_id).update_meta(lambda m: {
            **m, "name": name or m.get("name") or run_id, "entity": entity or m.get("entity") or "",
            "mode": self.name})

    def missing_run(self, project_path: str, wanted: str) -> str:
        return (f"no W&B run {wanted!r} in project {project_path} under {self.store.root} (offline: only runs "
                "written on this machine; synced runs are read with mode = \"online\")")

    def list_projects(self) -> list[str]:
        """The projects of the store that hold at least one run."""
        root = self.store.root
        return sorted(p.name for p in root.iterdir() if p.is_dir() and self.store.runs(p.name)) \
            if root.is_dir() else []

    def list_runs(self, project: str) -> list[Found]:
        """(run id, name, entity) of every run of ``project`` in the store, oldest first."""
        if project not in self.list_projects():
            known = ", ".join(self.list_projects()) or "none"
            raise CheckpointNotFound(f"no W&B project {project!r} under {self.store.root} (projects: {known})")
        return [(run_id, str(m.get("name") or run_id), str(m.get("entity") or ""))
                for run_id, m in self.store.runs(project)]

    # -- checkpoints ------------------------------------------------------------------------
    def _logger(self, run: RunInfo) -> Any:
        """The live run whose record log gets each checkpoint."""
        return live_run(self.live, run)

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: list[str], meta: dict[str, Any]) -> Stored:
        live = self._logger(run)
        rdir = self._rdir(run.project, run.run_id)
        uploaded = self._uploaded(rdir, ckpt)

        def log(number: int, final: Path) -> None:  # under the run's lock: W&B numbers in this order
            if live is not None:  # the record log points at the store's files, so sync uploads them
                self.sdk.log(live, run.run_id, final, LocalCheckpoint(final, ckpt.manifest), aliases, meta,
                             wait=False, registry=None)  # link_artifact needs the server: link after sync

        version, _ = rdir.add(ckpt, aliases, on_commit=log)
        return replace(to_stored(run, version.number, meta, aliases, path=str(version.path)), uploaded=uploaded)

    @staticmethod
    def _uploaded(rdir: RunDir, ckpt: LocalCheckpoint) -> int:
        """The bytes ``wandb sync`` will upload for ``ckpt``: W&B dedups by digest against the
        run's newest version, compared here by each file's hash and size in the two manifests
        (equal contents, so equal MD5).  The new manifest is always sent."""
        new = ckpt.manifest
        held: set[tuple[str, int]] = set()
        numbers = rdir.numbers()
        if numbers:
            try:
                old = rdir.storage.open_checkpoint(rdir.version_path(numbers[-1])).manifest
            except (CheckpointNotFound, IntegrityError):
                old = None  # being deleted, or damaged
            if old is not None and old.hash_algorithm == new.hash_algorithm:
                held = {(e.hash, e.size) for e in old.files.values()}
        files = [((e.hash, e.size), e.size) for e in new.files.values()]
        return (ckpt.path / MANIFEST).stat().st_size + sent_bytes(files, held)

    def list(self, run: RunInfo) -> list[Stored]:
        versions, _ = self._rdir(run.project, run.run_id).read()  # damaged ones: see damaged()
        return [to_stored(run, v.number, _metadata(v.manifest), v.aliases, path=str(v.path)) for v in versions]

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """The store's versions whose manifest is damaged: a reference meaning one of them is
        refused by the core, never answered with another version."""
        return self._rdir(run.project, run.run_id).read()[1]

    def sweep(self, run: RunInfo) -> None:
        self._rdir(run.project, run.run_id).sweep()

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        return self.store.storage.open_checkpoint(Path(stored.native.path))  # already on local disk

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        self._rdir(stored.run.project, stored.run.run_id).point(aliases, stored.version)

    def delete(self, stored: Stored) -> None:
        self._rdir(stored.run.project, stored.run.run_id).remove(stored.version)

    def link_input(self, run: RunInfo, source: Stored, record: dict[str, str]) -> None:
        live = self.live.get(run.project, run.run_id)
        if live is not None:
            with self.sdk.errors(f"recording in W&B that {run.ref} resumes from {source.ref}"):
                live.config.update({"ckpt_track": record}, allow_val_change=True)
        self._rdir(run.project, run.run_id).update_meta(
            lambda m: {**m, "inputs": [*m.get("inputs", []), record]})


class DisabledMode(OfflineMode):
    """The store alone: W&B is never called (no run is started, nothing is logged)."""

    name = "disabled"

    def start(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, resumed: bool) -> Any:
        return None

    def _logger(self, run: RunInfo) -> Any:
        return None
