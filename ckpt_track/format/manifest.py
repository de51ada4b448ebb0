"""``manifest.json``: the commit record of a checkpoint, and the format's constants.

A manifest lists every other file with its size and hash and carries a digest of
itself (``manifest_hash``), so any change to any byte of a checkpoint is caught.
Parsing checks every field's type: a manifest may be damaged or hostile.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ..errors import CheckpointNotFound, IntegrityError
from .files import check_name, load_json, open_regular, read_exact

FORMAT_VERSION = 1  # what a single process writes
SHARDED_FORMAT_VERSION = 2  # written by every rank of a process group (ckpt_track.distributed)
MAX_FORMAT_VERSION = SHARDED_FORMAT_VERSION  # the newest this ckpt_track reads
LAYOUT = "layout.json"  # v2: where each tensor's shards lie (the JSON stand-in for DCP's metadata)
FORMAT_NAME = "ckpt_track"
MANIFEST = "manifest.json"
STATE = "state.json"
HASH_ALGORITHM = "xxh3-128"
MAX_MANIFEST_BYTES = 64 * 1024**2  # a manifest lists files: far below this unless damaged or hostile
MAX_STATE_BYTES = 256 * 1024**2
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")
# keys of a manifest written before manifests carried their own digest (legacy v1)
_LEGACY_KEYS = frozenset({"format", "format_version", "step", "epoch", "created", "metrics", "lineage",
                          "hash_algorithm", "files"})


@dataclass(frozen=True)
class FileEntry:
    size: int
    hash: str


@dataclass(frozen=True)
class Manifest:
    """The committed description of one checkpoint."""

    step: int
    files: Mapping[str, FileEntry]
    epoch: int | None = None
    created: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    hash_algorithm: str = HASH_ALGORITHM
    format_version: int = FORMAT_VERSION
    #: the number of ranks that wrote it (format v2, sharded; None for a single process)
    world_size: int | None = None
    #: xxh3-128 of the manifest's canonical JSON without this key (None: a legacy manifest)
    manifest_hash: str | None = field(default=None, compare=False)

    @property
    def sharded(self) -> bool:
        """True for a checkpoint written by several ranks (format v2): tensors are stored as
        shards, described by ``layout.json``; restore it with ``ct.restore`` / ``resume``."""
        return self.format_version >= SHARDED_FORMAT_VERSION

    @property
    def size(self) -> int:
        """Bytes of all files except the manifest itself."""
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: its fields plus ``manifest_hash``, the digest of the rest
        (computed afresh, so a manifest re-serialized from this object stays valid)."""
        body = self.body()
        return {**body, "manifest_hash": manifest_digest(body)}

    def body(self) -> dict[str, Any]:
        """Every field except ``manifest_hash``: what the digest covers."""
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "epoch": self.epoch,
            "created": self.created,
            "metrics": dict(self.metrics),
            "lineage": dict(self.lineage),
            "hash_algorithm": self.hash_algorithm,
            "files": {k: {"size": v.size, "hash": v.hash} for k, v in sorted(self.files.items())},
        }
        if self.sharded:
            body["world_size"] = self.world_size
        return body

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        """Build a manifest from parsed JSON, checking every field's type (the digest is
        checked by :func:`parse_manifest`, which reads the file's bytes)."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if data.get("format") != FORMAT_NAME:
                raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
            version = _count(data["format_version"], "format_version")
            if version > MAX_FORMAT_VERSION:
                raise IntegrityError(
                    f"{where}: checkpoint format v{version} is newer than this ckpt_track reads "
                    f"(v{MAX_FORMAT_VERSION}); upgrade: pip install -U ckpt-track"
                )
            world = _count(data["world_size"], "world_size") if version >= SHARDED_FORMAT_VERSION else None
            if world == 0:
                raise ValueError("'world_size' is 0")
            digest = _checked_digest(data)
            epoch = data.get("epoch")
            return cls(
                step=_count(data["step"], "step"),
                epoch=None if epoch is None else _count(epoch, "epoch"),
                created=_typed(data.get("created", ""), str, "created"),
                metrics={str(k): float(_number(v, f"metric {k!r}"))
                         for k, v in _typed(data.get("metrics") or {}, dict, "metrics").items()},
                lineage=dict(_typed(data.get("lineage") or {}, dict, "lineage")),
                hash_algorithm=_typed(data.get("hash_algorithm", HASH_ALGORITHM), str, "hash_algorithm"),
                files={check_name(k, where): _file_entry(k, v)
                       for k, v in _typed(data["files"], dict, "files").items()},
                format_version=version,
                world_size=world,
                manifest_hash=digest,
            )
        except IntegrityError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IntegrityError(f"{where}: not a valid ckpt_track manifest ({exc}); the checkpoint is damaged") from exc


def _checked_digest(data: dict[str, Any]) -> str | None:
    """The manifest's ``manifest_hash`` when well formed; a manifest without one (legacy)
    must have exactly the legacy keys."""
    digest = data.get("manifest_hash")
    if digest is None:
        unknown = sorted(set(data) - _LEGACY_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in a manifest without 'manifest_hash'")
    elif not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"'manifest_hash' is {digest!r}, not a 32-digit hex digest")
    return digest


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{what!r} is {value!r}, expected a {kind.__name__}")
    return value


def _count(value: Any, what: str) -> int:
    """A non-negative int (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what!r} is {value!r}, expected a non-negative integer")
    return value


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} is {value!r}, expected a number")
    return value


def _file_entry(name: Any, value: Any) -> FileEntry:
    entry = _typed(value, dict, f"files/{name}")
    digest = _typed(entry["hash"], str, f"files/{name}/hash")
    return FileEntry(_count(entry["size"], f"files/{name}/size"), digest)


def canonical_json(obj: Any) -> bytes:
    """The exact bytes ckpt_track writes for a JSON file of a checkpoint (sorted keys, one
    space indent): a manifest must be exactly this, so any edit is detectable."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode()


def manifest_digest(body: Mapping[str, Any]) -> str:
    """xxh3-128 of the canonical JSON of a manifest without its ``manifest_hash``."""
    return xxhash.xxh3_128(canonical_json(dict(body))).hexdigest()


@dataclass(frozen=True)
class LocalCheckpoint:
    """A committed checkpoint directory on local disk."""

    path: Path
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def sharded(self) -> bool:
        """True for a checkpoint written by several ranks (format v2): tensors are stored as
        shards, described by ``layout.json``; restore it with ``ct.restore`` / ``resume``."""
        return self.format_version >= SHARDED_FORMAT_VERSION

    @property
    def size(self) -> int:
        return self.manifest.size


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``path/manifest.json`` (see :func:`parse_manifest`).

    Raises :class:`CheckpointNotFound` when there is none (an uncommitted or
    foreign directory) and :class:`IntegrityError` when it is unreadable,
    damaged, a link or a special file.
    """
    mpath = Path(path) / MANIFEST
    try:
        with open_regular(mpath, MAX_MANIFEST_BYTES) as f:
            raw = read_exact(f, os.fstat(f.fileno()).st_size, mpath)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CheckpointNotFound(f"{path} is not a committed checkpoint (no {MANIFEST})") from exc
    except OSError as exc:
        raise IntegrityError(f"{mpath}: cannot be read ({exc.strerror or exc}); fix its permissions or use another checkpoint") from exc
    return parse_manifest(raw, str(mpath))


def parse_manifest(raw: bytes, where: str = MANIFEST) -> Manifest:
    """Parse a manifest's bytes.  A manifest carrying ``manifest_hash`` must be exactly the
    canonical JSON ckpt_track writes (so even a whitespace change is caught) and match its
    digest: any change to any byte is an :class:`IntegrityError`.  One without it (written
    before manifests had a digest) is accepted with its legacy keys only."""
    data = load_json(raw, where)
    manifest = Manifest.from_json(data, where=where)
    if manifest.manifest_hash is None:
        return manifest
    if manifest.hash_algorithm != HASH_ALGORITHM:
        raise IntegrityError(f"{where}: unknown hash algorithm {manifest.hash_algorithm!r}; "
                             "upgrade ckpt_track (pip install -U ckpt-track)")
    body = {k: v for k, v in data.items() if k != "manifest_hash"}
    if canonical_json(data) != raw or manifest_digest(body) != manifest.manifest_hash:
        raise IntegrityError(f"{where}: the manifest does not match its own manifest_hash (it was modified "
                             "or corrupted); do not use this checkpoint, restore another one")
    return manifest
