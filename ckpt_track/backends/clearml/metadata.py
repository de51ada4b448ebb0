"""What ckpt_track keeps in ClearML besides the files, and the handles it hands the core.

A checkpoint's record (step, epoch, metrics, lineage, the tensor files it takes) is stored as
string metadata of its model (online) or artifact (offline), under the marker ``format =
ckpt_track/1``: an item without it is not one of ours.  A task's version counter and alias table
are user properties, which survive ``clearml-task --import-offline-session``.  Everything here
is plain data: no SDK call, so it works (and is tested) without a server.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import refs
from ...errors import IntegrityError
from ...format import MANIFEST, Manifest, is_blob

__all__ = ["BLOB", "FORMAT", "HEX", "P_ALIASES", "P_CONTINUES", "P_RESUMED", "P_VERSION", "RUN_TAG", "ClearmlCheckpoint",
           "ClearmlRun", "Item", "Record", "State", "alias_table", "artifact_items", "blob_missing", "encode_table", "make_record", "model_item",
           "own_files", "parse_record", "restore_commands", "stored_blobs", "user_properties"]

HEX = r"[0-9a-f]{32}"
FORMAT = "ckpt_track/1"  # metadata marker: an item without it is not one of our checkpoints
# user properties of a task: the tracker-side high-water mark of version numbers (a deleted
# version's number is never reused), the alias table (offline checkpoints have no tags), and
# the checkpoint a resumed run continues from
P_VERSION, P_ALIASES, P_RESUMED = "ckpt_track_last_version", "ckpt_track_aliases", "ckpt_track_resumed_from"
# user property of an offline session that continues an earlier one (the SDK cannot reopen a session)
P_CONTINUES = "ckpt_track_continues"
BLOB = "ckpt_track-blob-"  # + file name: the task artifact holding one content-addressed tensor file
RUN_TAG = "ckpt_track_run_id="  # task system tag holding a user-chosen run id (ClearML picks task ids itself)


@dataclass(frozen=True)
class ClearmlRun:
    """``RunInfo.native``: the task behind a run."""

    task_id: str
    offline: bool  # an offline session (``offline-<hex>``), read from the folder or zip the SDK wrote
    url: str | None = None  # the task's page in the web UI (online runs)


@dataclass(frozen=True)
class ClearmlCheckpoint:
    """``Stored.native``: where one checkpoint lives in ClearML."""

    kind: str  # "model" (online puts) | "artifact" (offline puts, also after an import)
    key: str  # model id or artifact name
    uri: str  # the stored package (model weights URL, or artifact URL / session path)
    blobs: tuple[str, ...]  # the content-addressed files it takes from the task's artifacts
    task_id: str
    session: str | None = None  # offline: the session folder or zip it was read from
    url: str | None = None  # the model's page in the web UI


@dataclass(frozen=True)
class Record:
    """A checkpoint's metadata, parsed."""

    version: int
    step: int
    epoch: int | None
    created: str
    size: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    blobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Item:
    """One checkpoint as found in the tracker."""

    kind: str  # "model" | "artifact"
    key: str  # model id or artifact name
    record: Record
    tags: tuple[str, ...] = ()
    uri: str = ""

    @property
    def version(self) -> int:
        return self.record.version


@dataclass(frozen=True)
class State:
    """What a run holds: its checkpoints, user properties, stored tensor files (file name ->
    artifact entry) and, offline, the session folder or zip it was read from."""

    items: list[Item]
    props: dict[str, str]
    blobs: dict[str, Any]
    session: str | None = None

    def held_sizes(self) -> dict[str, int | None]:
        """The stored tensor files with their sizes, as ``plan.files_to_send`` takes them."""
        return {f: _size(a) for f, a in self.blobs.items()}


def _size(artifact: Any) -> int | None:
    size = artifact.get("content_size") if isinstance(artifact, Mapping) else getattr(artifact, "size", None)
    return int(size) if isinstance(size, int) else None


def restore_commands(task_ref: str, step: int) -> tuple[str, str]:
    """The exact commands that restore the checkpoint at ``step`` of the run ``task_ref``
    (``clearml://<task_id>``): the CLI one and the Python one, as the UI shows them."""
    return refs.restore_commands(f"{task_ref}@step={step}")


def make_record(m: Manifest, version: int, task_ref: str | None = None) -> dict[str, str]:
    """Checkpoint metadata as strings (what both model metadata and artifact metadata hold);
    with ``task_ref``, also the commands that restore it (``restore``, ``restore_python``)."""
    rec = {"format": FORMAT, "version": str(version), "step": str(m.step), "created": m.created,
           "size": str(m.size), "metrics": json.dumps(dict(m.metrics), sort_keys=True),
           "lineage": json.dumps(dict(m.lineage), sort_keys=True, default=str)}
    if task_ref:
        rec["restore"], rec["restore_python"] = restore_commands(task_ref, m.step)
    if m.epoch is not None:
        rec["epoch"] = str(m.epoch)
    if blobs := sorted(f for f in m.files if is_blob(f)):
        rec["blobs"] = json.dumps(blobs)  # stored as task artifacts, not in the checkpoint's own package
    return rec


def parse_record(meta: Mapping[str, str]) -> Record | None:
    """The record in an item's metadata; None for an item that is not ours (or is damaged:
    a damaged one is skipped with a warning rather than failing the whole listing)."""
    if meta.get("format") != FORMAT:
        return None
    try:
        return Record(version=int(meta["version"]), step=int(meta["step"]),
                      epoch=int(meta["epoch"]) if meta.get("epoch") not in (None, "", "None") else None,
                      created=meta.get("created", ""), size=int(meta.get("size") or 0),
                      metrics={k: float(v) for k, v in json.loads(meta.get("metrics") or "{}").items()},
                      lineage=json.loads(meta.get("lineage") or "{}"),
                      blobs=_blob_names(json.loads(meta.get("blobs") or "[]")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        warnings.warn(f"clearml: skipping a checkpoint with damaged metadata ({exc})", stacklevel=3)
        return None


def _blob_names(names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and is_blob(n) for n in names):
        raise ValueError(f"'blobs' is not a list of tensor file names: {str(names)[:80]}")
    return tuple(names)


def own_files(m: Manifest) -> list[str]:
    """The files a checkpoint's own model or artifact holds: all but the content-addressed ones."""
    return [*sorted(f for f in m.files if not is_blob(f)), MANIFEST]


def user_properties(task: Mapping[str, Any]) -> dict[str, str]:
    """User properties of a task document (server answer or offline task.json)."""
    props = (task.get("hyperparams") or {}).get("properties") or {}
    return {k: str(v.get("value", "")) for k, v in props.items()}


def _task_artifacts(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((task.get("execution") or {}).get("artifacts") or [])


def artifact_items(task: Mapping[str, Any]) -> list[Item]:
    """The checkpoints a task document holds as artifacts (offline puts, imported sessions)."""
    items = []
    for a in _task_artifacts(task):
        rec = parse_record({str(k): str(v) for k, v in a.get("display_data") or []})
        if rec is not None:
            items.append(Item("artifact", a["key"], rec, uri=a.get("uri") or ""))
    return items


def stored_blobs(task: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The task's stored tensor files: file name -> artifact entry."""
    return {a["key"][len(BLOB):]: a for a in _task_artifacts(task)
            if a["key"].startswith(BLOB) and is_blob(a["key"][len(BLOB):])}


def model_item(row: Mapping[str, Any]) -> Item | None:
    """The checkpoint a model row of the server is, or None when it is not one of ours."""
    meta = {str(k): str((v or {}).get("value", "")) for k, v in (row.get("metadata") or {}).items()}
    rec = parse_record(meta)
    if rec is None:
        return None
    return Item("model", row["id"], rec, tuple(row.get("tags") or ()), row.get("uri") or "")


def alias_table(props: Mapping[str, str]) -> dict[str, int]:
    """The alias table of a task's user properties (alias -> version); a damaged one is
    ignored with a warning (the model tags still carry the online aliases)."""
    try:
        return {str(k): int(v) for k, v in json.loads(props.get(P_ALIASES) or "{}").items()}
    except (TypeError, ValueError, AttributeError):
        warnings.warn(f"clearml: ignoring a damaged {P_ALIASES} user property", stacklevel=3)
        return {}


def encode_table(table: Mapping[str, int]) -> str:
    return json.dumps(dict(table), sort_keys=True)


def blob_missing(where: object, fname: str, task_id: str) -> IntegrityError:
    """A checkpoint lists a tensor file its task no longer holds."""
    return IntegrityError(f"{where} needs {fname}, but task {task_id} has no artifact {BLOB}{fname} "
                          "(deleted outside ckpt_track?); this checkpoint cannot be restored")
