"""What the Comet backend keeps about its objects: the typed handles it puts in
``RunInfo.native`` / ``Stored.native`` (read by this backend only), the names of the
experiment "others" it writes, the ``ckpt_track.state`` other (alias table, highest version,
tombstones: Comet models have no aliases), and the metadata every model element carries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import refs
from ...errors import IntegrityError
from ...format import MANIFEST, LocalCheckpoint, is_blob
from ...plan import AliasTable
from ...records import RunInfo, Stored
from ...refs import Ref

__all__ = ["BLOB_PREFIX", "RESUMED_FROM_KEY", "RUN_ID_KEY", "STATE_KEY", "AliasState", "CometCopy", "CometModel",
           "CometRegistryModel", "CometRun", "Found", "checkpoint_meta", "read_meta", "restore_commands", "stored",
           "summary_others"]

STATE_KEY = "ckpt_track.state"
RUN_ID_KEY = "ckpt_track.run_id"
RESUMED_FROM_KEY = "ckpt_track.resumed_from"
BLOB_PREFIX = "ckpt_track/blobs/"  # experiment asset name of a content-addressed tensor file


@dataclass(frozen=True)
class CometRun:
    """``RunInfo.native`` of an experiment."""

    key: str
    workspace: str | None


@dataclass(frozen=True)
class CometRegistryModel:
    """``RunInfo.native`` of a registry model (read-only: its versions are ``Stored``)."""

    workspace: str
    model: str


@dataclass(frozen=True)
class CometModel:
    """``Stored.native`` of a checkpoint read from Comet: its experiment model, the asset id
    of each file, and which files are shared blob assets of the experiment rather than
    elements of the model."""

    model: str
    experiment: str
    assets: tuple[tuple[str, str], ...]
    shared: tuple[str, ...] = ()
    registry: bool = False  # reached through the model registry

    @property
    def ids(self) -> dict[str, str]:
        return dict(self.assets)


@dataclass(frozen=True)
class CometCopy:
    """``Stored.native`` offline: the model the archive will hold, and the local copy that
    offline reads restore from."""

    model: str
    experiment: str
    path: str


@dataclass(frozen=True)
class Found:
    """An experiment as looked up: key, where it lives, its name and ckpt_track run id."""

    key: str
    workspace: str | None
    project: str
    name: str | None
    run_id: str | None


@dataclass
class AliasState:
    """The ``ckpt_track.state`` other: alias table, version high-water mark, tombstones."""

    aliases: dict[str, int] = field(default_factory=dict)
    last_version: int = 0
    deleted: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, value: Any, where: str) -> AliasState:
        """From the other's JSON text (or the table itself); damage is an ``IntegrityError``."""
        if not value:
            return cls()
        try:
            d = json.loads(value) if isinstance(value, str) else value
            return cls({str(k): int(v) for k, v in d.get("aliases", {}).items()},
                       int(d.get("last_version", 0)), sorted(int(v) for v in d.get("deleted", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where}: {STATE_KEY!r} is damaged ({exc}); fix or delete it in Comet's "
                                 "Others tab (aliases are lost, checkpoints are not)") from exc

    def dump(self) -> str:
        return json.dumps({"aliases": self.aliases, "last_version": self.last_version, "deleted": self.deleted},
                          sort_keys=True)

    def point(self, aliases: Sequence[str], version: int) -> AliasState:
        table = AliasTable(self.aliases).point(aliases, version)
        return AliasState(table.as_dict(), max(self.last_version, version), list(self.deleted))

    def tombstone(self, version: int) -> AliasState:
        """``version`` deleted: its aliases go, its number is never given out again."""
        table = AliasTable(self.aliases).without(version)
        return AliasState(table.as_dict(), max(self.last_version, version), sorted({*self.deleted, version}))

    def aliases_of(self, version: int) -> tuple[str, ...]:
        return AliasTable(self.aliases).of(version)


def restore_commands(ref: str) -> dict[str, str]:
    """How to get a checkpoint back, as the UI shows it: the CLI line and the Python call."""
    cli, python = refs.restore_commands(ref)
    return {"cli": cli, "python": python}


def checkpoint_meta(version: int, ckpt: LocalCheckpoint, aliases: Sequence[str],
                    run_ref: Ref | None = None) -> dict[str, Any]:
    """The metadata of every element of a checkpoint's model: what listing reads back, and
    the size of each file (``files``: the model's elements, ``blobs``: shared tensor files),
    so that a half-uploaded model is never listed; with ``run_ref``, also the reference of
    this step and the commands that restore it (what the Models tab shows)."""
    m = ckpt.manifest
    files = {f: e.size for f, e in m.files.items() if not is_blob(f)}
    files[MANIFEST] = (ckpt.path / MANIFEST).stat().st_size
    blobs = {f: e.size for f, e in m.files.items() if is_blob(f)}
    return {"ckpt_track": 1, "version": version, "step": m.step, "epoch": m.epoch, "metrics": dict(m.metrics),
            "aliases": sorted(aliases), "created": m.created, "size": m.size, "lineage": dict(m.lineage),
            "files": files, **({"blobs": blobs} if blobs else {}), **_restore(run_ref, m.step)}


def _restore(run_ref: Ref | None, step: int) -> dict[str, Any]:
    if run_ref is None:
        return {}
    ref = str(run_ref.select(step=step))
    return {"ref": ref, "restore": restore_commands(ref)}


def summary_others(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment others a checkpoint sets: the newest one, and the best one when it is
    ``best`` (Comet's Others tab), with the line that restores it."""
    out: dict[str, Any] = {}
    for which in ("latest", "best"):
        if which == "latest" or which in meta.get("aliases", ()):
            out[f"ckpt_track.{which}_step"] = meta["step"]
            if "ref" in meta:
                out[f"ckpt_track.{which}"] = meta["ref"]
                out[f"ckpt_track.{which}_restore"] = meta["restore"]["cli"]
    return out


def read_meta(assets: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Our metadata from any element of a model (Comet returns it as a JSON string)."""
    for a in assets:
        raw = a.get("metadata")
        try:
            meta = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            continue
        if isinstance(meta, dict) and "ckpt_track" in meta:
            return meta
    return None


def stored(run: RunInfo, version: int, meta: Mapping[str, Any], aliases: Sequence[str], native: Any) -> Stored:
    """A ``Stored`` from checkpoint metadata (a model's, or a manifest's fields)."""
    return Stored(
        ref=run.ref.select(version=version), run=run, version=version, step=int(meta["step"]),
        epoch=None if meta.get("epoch") is None else int(meta["epoch"]), aliases=tuple(aliases),
        metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
        size=int(meta.get("size") or 0), created=str(meta.get("created") or ""),
        lineage=dict(meta.get("lineage") or {}), native=native)
