"""What ckpt_track writes on an MLflow LoggedModel and reads back from it: the typed handles
kept in ``RunInfo.native`` / ``Stored.native``, the tag names, and the translation between a
LoggedModel and a :class:`~ckpt_track.records.Stored`.

The tags are the checkpoint's metadata in MLflow (what its UI shows under the model's tags),
so they are the only place ``list`` reads a checkpoint's step, version, aliases and lineage
from: no download is needed to list a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ...format import Manifest
from ...records import RunInfo, Stored

__all__ = [
    "BLOBS", "TAG_ALIAS", "TAG_LAST_VERSION", "TAG_REGISTERED", "TAG_STEP", "TAG_VERSION",
    "MlflowModel", "MlflowRun", "millis", "model_tags", "stored_from",
]

TAG_VERSION = "ckpt_track.version"
TAG_LAST_VERSION = "ckpt_track.last_version"  # run tag: the tracker-side high-water mark of version numbers
TAG_ALIAS = "ckpt_track.alias."
TAG_STEP = "step"
TAG_REGISTERED = "ckpt_track.registered_version"
LINEAGE_TAGS = {"parent": "ckpt_track.parent", "resumed_from": "ckpt_track.resumed_from",
                "config_hash": "ckpt_track.config_hash", "run": "ckpt_track.run",
                # a record whose files are in object storage ([storage] url): where, and the full size
                "storage": "ckpt_track.storage", "storage_size": "ckpt_track.storage_size"}
BLOBS = "ckpt_track/blobs"  # run artifact directory of the content-addressed tensor files


@dataclass(frozen=True)
class MlflowRun:
    """``RunInfo.native``: where a run's models are searched and its shared files live."""

    experiment_id: str
    artifact_uri: str


@dataclass(frozen=True)
class MlflowModel:
    """``Stored.native``: the LoggedModel holding one checkpoint version."""

    model_id: str
    artifact_location: str
    registered_version: str | None = None  # its version in the model registry (``register_as``)


def model_tags(m: Manifest, version: int) -> dict[str, str]:
    """The tags of the LoggedModel of checkpoint ``m``, stored as version ``version``."""
    git = m.lineage.get("git") or {}
    return {
        TAG_VERSION: str(version), TAG_STEP: str(m.step), "ckpt_track.epoch": str(m.epoch),
        "ckpt_track.size": str(m.size), "ckpt_track.created": m.created,
        "ckpt_track.format_version": str(m.format_version),
        **{t: str(m.lineage[k]) for k, t in LINEAGE_TAGS.items() if m.lineage.get(k)},
        **({"ckpt_track.git_commit": str(git.get("commit")), "ckpt_track.git_dirty": str(git.get("dirty"))}
           if git else {}),
    }


def stored_from(run: RunInfo, model: Any) -> Stored:
    """The checkpoint version a ckpt_track LoggedModel (one with a ``TAG_VERSION`` tag) holds."""
    tags = model.tags
    version = int(tags[TAG_VERSION])
    epoch = tags.get("ckpt_track.epoch", "")
    return Stored(
        ref=run.ref.select(version=version), run=run, version=version, step=int(tags.get(TAG_STEP, 0)),
        epoch=int(epoch) if epoch not in ("", "None") else None,
        aliases=tuple(sorted(k[len(TAG_ALIAS):] for k in tags if k.startswith(TAG_ALIAS))),
        metrics={x.key: float(x.value) for x in (model.metrics or [])},
        size=int(tags.get("ckpt_track.size", 0)), created=tags.get("ckpt_track.created", ""),
        lineage={k: tags.get(t) for k, t in LINEAGE_TAGS.items()},  # None: recorded as absent
        native=MlflowModel(model.model_id, model.artifact_location, tags.get(TAG_REGISTERED)),
    )


def millis(iso: str) -> int:
    """A metric timestamp (ms since the epoch) from the manifest's ISO creation time, so a
    checkpoint's metrics show at the time it was taken; now when the time is unreadable."""
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except ValueError:
        return int(datetime.now().timestamp() * 1000)
