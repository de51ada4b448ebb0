"""Redundant copies of the files of tracker records: ``[storage] replicas = ["s3://b/...",
"file:///mnt/backup/..."]`` next to ``[storage] url``.

A checkpoint counts as committed once the first copy (``url``) holds it; each replica is then
filled from that copy by the upload thread (objects first, the record's manifest last, so a
replica never names an object it lacks).  A replica that fails is noted on local disk
(``<spool>/.replicas/``) and retried on every later upload pass and at ``finish()``; nothing
blocks the loop.  A restore takes the first copy that is reachable and whose bytes verify, and
logs which one it used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .config import STORAGE_SECTION, Settings
from .errors import CkptTrackError, ConfigError
from .format import MANIFEST, parse_manifest
from .format.manifest import MAX_MANIFEST_BYTES
from .objstore import ObjectStore, storage_errors, storage_options

__all__ = ["copies", "mirror", "open_store", "replica_urls", "retry_pending", "schedule"]

log = logging.getLogger("ckpt_track")
_CHUNK = 8 * 1024 * 1024


def replica_urls(settings: Settings) -> list[str]:
    """The ``[storage] replicas`` setting: a list of URLs (``file://`` allowed), or a
    comma-separated string from the environment."""
    value = settings.backend_options(STORAGE_SECTION).get("replicas") or []
    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and "://" in v for v in value):
        raise ConfigError(f"[storage] replicas must be a list of URLs (s3://bucket/prefix, file:///mnt/backup), "
                          f"got {value!r}")
    return [v.rstrip("/") for v in value]


def open_store(settings: Settings, url: str) -> ObjectStore:
    """The store at ``url`` with the ``[storage]`` options (none for a ``file://`` replica)."""
    section = settings.backend_options(STORAGE_SECTION)
    return ObjectStore(url, storage_options(section) if not url.startswith("file://") else {},
                       part_size=section.get("part_size"))


def copies(settings: Settings, primary: str) -> list[str]:
    """Every copy in the order a restore tries them: the first copy, then each replica."""
    return [primary, *[u for u in replica_urls(settings) if u != primary]]


def mirror(src: ObjectStore, dst: ObjectStore, record: str) -> int:
    """Copy the record at ``record`` (a key relative to the prefix) and every object it names
    from ``src`` to ``dst``, objects first; returns the bytes copied."""
    raw = src.cat(src.path(record), MAX_MANIFEST_BYTES, "a record's manifest")
    if raw is None:
        return 0  # deleted from the first copy meanwhile: nothing to mirror
    manifest = parse_manifest(raw, src.show(src.path(record)))
    objects = {src.object_path(e): e.size for f, e in manifest.files.items() if f != MANIFEST}
    targets = {p: dst.path(*p[len(src.root) + 1:].split("/")) for p in objects}
    have = dst.sizes(list(targets.values()))
    sent = 0
    for path, size in objects.items():
        if have[targets[path]] == size:
            continue
        with storage_errors("copying an object to a replica", dst.url):
            dst.fs.makedirs(dst.fs._parent(targets[path]), exist_ok=True)
            with src.fs.open(path, "rb") as fin, dst.fs.open(targets[path], "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
        sent += size
    with storage_errors("writing a replica's record", dst.url):
        dst.fs.makedirs(dst.fs._parent(dst.path(record)), exist_ok=True)
    dst.write(dst.path(record), raw, "a replica's record")
    return sent


def _note(spool_root: Path, primary: str, replica: str, record: str) -> Path:
    key = hashlib.sha256(f"{primary}\0{replica}\0{record}".encode()).hexdigest()[:24]
    path = spool_root / ".replicas" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"primary": primary, "replica": replica, "record": record}))
    return path


def schedule(settings: Settings, primary: str, record: str, spool_root: Path) -> None:
    """Note a new record for every replica, then try each at once (failures stay noted)."""
    notes = [_note(spool_root, primary, r, record) for r in copies(settings, primary)[1:]]
    if notes:
        retry_pending(settings, spool_root)


def retry_pending(settings: Settings, spool_root: Path) -> list[str]:
    """Fill every replica that is owed a record; returns what is still owed (logged)."""
    folder = spool_root / ".replicas"
    if not folder.is_dir():
        return []
    stores: dict[str, ObjectStore] = {}
    owed: list[str] = []
    for note in sorted(folder.glob("*.json")):
        try:
            job: dict[str, Any] = json.loads(note.read_text())
            src = stores.setdefault(job["primary"], open_store(settings, job["primary"]))
            dst = stores.setdefault(job["replica"], open_store(settings, job["replica"]))
            mirror(src, dst, job["record"])
        except (CkptTrackError, OSError, KeyError, ValueError) as exc:
            owed.append(f"{job.get('replica', '?') if isinstance(job, dict) else '?'}: {exc}")
            continue
        note.unlink(missing_ok=True)
    if owed:
        log.warning("ckpt_track: %d replica cop%s still owed, retried later: %s", len(owed),
                    "y" if len(owed) == 1 else "ies", "; ".join(owed[:3]))
    return owed
