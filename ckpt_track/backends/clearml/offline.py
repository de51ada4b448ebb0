"""Offline ClearML sessions: the SDK's ``<cache>/offline/offline-<hex>/`` folder (``task.json``,
``metrics.jsonl``, the artifact files) and the ``offline-<hex>.zip`` it packs at the end.

``OutputModel`` cannot upload offline (clearml 2.x: ``'DummyModel' object has no attribute
'locked'``), so an offline checkpoint is a task artifact (``upload_artifact`` of its files)
with the same metadata, and its aliases live in the task's user properties.  Until the
session is imported (``clearml-task --import-offline-session``) ``list``/``get`` read the
session as the SDK left it, folder or zip, with no server.  A closed session is read-only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import BackendError, CheckpointNotFound, IntegrityError
from ...format import LocalCheckpoint
from ...records import RunInfo, Stored
from .metadata import (
    HEX,
    RUN_TAG,
    ClearmlCheckpoint,
    Item,
    State,
    artifact_items,
    blob_missing,
    own_files,
    parse_record,
    stored_blobs,
    user_properties,
)
from .package import copy_member, unzip
from .tasks import OpenTask

__all__ = ["Offline", "Sessions"]

_REREADS = 3  # the SDK rewrites task.json in place while the run is open
_SESSION = re.compile(rf"offline-{HEX}(\.zip)?")


def _written(where: Path) -> int:
    """When a session was last written: its task.json (a folder the SDK still writes) or zip."""
    target = where / "task.json" if where.is_dir() else where
    try:
        return target.stat().st_mtime_ns
    except OSError:
        return 0


class Sessions:
    """The offline sessions on this machine: ``[clearml] offline_dir`` (or ``?offline_dir=``)
    first, then the SDK's own offline folder."""

    def __init__(self, offline_dir: Path | None) -> None:
        self.offline_dir = offline_dir

    def dirs(self) -> list[Path]:
        from clearml.config import get_offline_dir

        return [*([self.offline_dir] if self.offline_dir else []), Path(get_offline_dir())]

    def doc(self, task_id: str) -> tuple[dict[str, Any], str]:
        """(task.json, the folder or zip it came from) of the session ``task_id``."""
        for base in self.dirs():
            folder, archive = base / task_id, base / f"{task_id}.zip"
            for attempt in range(_REREADS):
                try:
                    if (folder / "task.json").is_file():
                        return json.loads((folder / "task.json").read_text()), str(folder)
                    if archive.is_file():
                        with zipfile.ZipFile(archive) as zf:
                            return json.loads(zf.read("task.json")), str(archive)
                    break
                except ValueError:
                    if attempt == _REREADS - 1:
                        raise IntegrityError(f"offline session {task_id} has an unreadable task.json") from None
        where = ", ".join(map(str, self.dirs())) or "(no offline folder configured)"
        raise CheckpointNotFound(f"no offline ClearML session {task_id} in {where}; pass ?offline_dir=<folder> "
                                 "or set [clearml] offline_dir to where the session folder or zip is")

    def ids(self) -> list[str]:
        """The ids of every session folder or zip in :meth:`dirs`."""
        return sorted({p.name.removesuffix(".zip") for d in self.dirs() if d.is_dir()
                       for p in d.glob("offline-*") if _SESSION.fullmatch(p.name)})

    def find(self, *, run_id: str | None = None, name: str | None = None,
             project: str | None = None) -> list[dict[str, Any]]:
        """The task documents of the sessions with that run id, name and project, the most
        recently written last (session ids are random, so the order is the files' times)."""
        found = []
        for tid in self.ids():
            doc, where = self.doc(tid)
            if project is not None and doc.get("project_name") != project:
                continue
            if run_id is not None and RUN_TAG + run_id not in (doc.get("system_tags") or []):
                continue
            if name is not None and doc.get("name") != name:
                continue
            found.append((_written(Path(where)), tid, doc))
        return [doc for _, _, doc in sorted(found, key=lambda f: (f[0], f[1]))]

    def copy_file(self, h: ClearmlCheckpoint, uri: str, target: Path) -> None:
        """Copy one stored file (artifact ``uri``) out of the session's folder or zip."""
        session = Path(h.session or "")
        doc = self.doc(h.task_id)[0]
        rel = os.path.relpath(uri, doc.get("offline_folder") or session)
        if session.is_dir():
            shutil.copyfile(session / rel, target)
        else:
            copy_member(session, Path(rel).as_posix(), target)


class Offline:
    """Where the checkpoints of an offline session live."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def ready(self) -> None:
        """Nothing to reach: the session is on local disk."""

    def state(self, run: RunInfo, task_id: str) -> State:
        doc, where = self.sessions.doc(task_id)
        return State(artifact_items(doc), user_properties(doc), stored_blobs(doc), where)

    def reopen(self, run: RunInfo, task_id: str) -> OpenTask:
        raise BackendError(f"{run.ref} cannot be changed: a closed offline session is read-only; "
                           "import it with clearml-task --import-offline-session <zip> first")

    def edit_props(self, run: RunInfo, task_id: str, props: Mapping[str, str]) -> None:
        self.reopen(run, task_id)  # raises: only the process that writes a session may change it

    def store(self, op: OpenTask, run: RunInfo, ckpt: LocalCheckpoint, version: int, record: Mapping[str, str],
              aliases: Sequence[str], state: State, table: dict[str, int]) -> tuple[Item, dict[str, int]]:
        """Upload the checkpoint as an artifact; its aliases go into the alias table."""
        name = f"ckpt-v{version:06d}"
        if not op.task.upload_artifact(name, artifact_object=[ckpt.path / f for f in own_files(ckpt.manifest)],
                                       metadata=dict(record), wait_on_upload=True):
            raise BackendError(f"ClearML did not store the artifact for step {ckpt.step} in {run.ref}")
        rec = parse_record(record)
        assert rec is not None
        return Item("artifact", name, rec, uri=str(op.task.artifacts[name].url)), {
            **table, **{a: version for a in aliases}}

    def handle(self, item: Item, task_id: str, state: State) -> ClearmlCheckpoint:
        return ClearmlCheckpoint(item.kind, item.key, item.uri, item.record.blobs, task_id, session=state.session)

    def set_tags(self, state: State, stored: Stored, aliases: set[str]) -> None:
        """Nothing: offline checkpoints have no tags, the alias table is all there is."""

    def drop_files(self, uris: Sequence[str]) -> None:
        """The SDK leaves a deleted artifact's file in the session folder: remove it."""
        for uri in uris:
            if uri and Path(uri).exists():
                shutil.rmtree(Path(uri).parent, ignore_errors=True)

    def fetch_own(self, h: ClearmlCheckpoint, into: Path) -> None:
        package = into / ".package.zip"
        self.sessions.copy_file(h, h.uri, package)
        unzip(package, into)
        package.unlink()

    def fetch_blobs(self, stored: Stored, names: Sequence[str], into: Path) -> None:
        h: ClearmlCheckpoint = stored.native
        held = stored_blobs(self.sessions.doc(h.task_id)[0])
        for fname in names:
            if fname not in held:
                raise blob_missing(stored.ref, fname, h.task_id)
        for fname in names:
            self.sessions.copy_file(h, held[fname]["uri"], into / fname)
