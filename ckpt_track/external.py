"""Tracker records whose files live in object storage (``[storage] url = "s3://bucket/prefix"``).

With a storage URL set, every backend is handed a small *record* instead of the checkpoint:
a plain checkpoint directory with the same step, epoch, creation time, metrics and lineage,
holding ``state.json`` and ``objects.json`` (the original manifest and the URL).  Every file of
the checkpoint goes to ``<url>/objects/<xxh3-128>`` first, content-addressed and shared by every
run and project under the prefix, so a tensor stored once is never sent again.  The backends
need not know: they move the record like any checkpoint, and their UIs show its step, metrics,
aliases and lineage.  The original manifest is also written to
``<url>/records/<backend>/<project>/<run_id>/<step>-<created>.json``: that is what keeps its
objects alive for ``gc`` of the bucket, and what retention removes with the tracker's version.

Reading back (:func:`materialize`), the record is verified, the original manifest taken from it,
and every file downloaded from the bucket into the cache; the restore then verifies every byte.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from . import cache
from .config import STORAGE_SECTION, Settings
from .errors import ConfigError, IntegrityError
from .format import MANIFEST, LocalCheckpoint, commit_staged, is_blob, parse_manifest, read_state, verify
from .format.files import load_json
from .objstore import ObjectStore, is_url, storage_options
from .records import Stored

__all__ = ["POINTER", "externalize", "forget", "is_record", "materialize", "storage_url"]

POINTER = "objects.json"
POINTER_FORMAT = "ckpt_track-objects/1"
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def storage_url(settings: Settings) -> str | None:
    """The ``[storage] url`` setting, checked (None when unset)."""
    url = str(settings.backend_options(STORAGE_SECTION).get("url") or "").strip()
    if not url:
        return None
    if not is_url(url):
        raise ConfigError(f"[storage] url = {url!r} is not an object-store URL (s3://bucket/prefix, gs://..., "
                          "az://...); for a directory on this machine use [local] root instead")
    return url.rstrip("/")


def _store(settings: Settings, url: str) -> ObjectStore:
    section = settings.backend_options(STORAGE_SECTION)
    return ObjectStore(url, storage_options(section), part_size=section.get("part_size"))


def _record_key(store: ObjectStore, backend: str, project: str, run_id: str, step: int, created: str) -> str:
    name = _SAFE.sub("_", f"{step}-{created}")
    return store.path("records", _SAFE.sub("_", backend), _SAFE.sub("_", project), _SAFE.sub("_", run_id),
                      f"{name}.json")


def is_record(ckpt: LocalCheckpoint) -> bool:
    return POINTER in ckpt.manifest.files


def externalize(ckpt: LocalCheckpoint, settings: Settings, url: str, backend: str, project: str,
                run_id: str, scratch: Path) -> LocalCheckpoint:
    """Upload ``ckpt``'s files to the bucket and return the record to hand to ``backend``
    (a directory under ``scratch``; the caller removes it)."""
    store = _store(settings, url)
    store.check()
    files = {f: e for f, e in ckpt.manifest.files.items() if f != MANIFEST}
    local = {store.object_path(e): ckpt.path / f for f, e in files.items()}
    _sent, found = store.upload(local, f"checkpoint step {ckpt.step}")
    raw = (ckpt.path / MANIFEST).read_bytes()
    m = ckpt.manifest
    store.write(_record_key(store, backend, project, run_id, m.step, m.created), raw, "the record's manifest")
    if found:  # as for a version of a bucket store: re-check shared objects once the manifest protects them
        store.upload({p: local[p] for p in found}, f"checkpoint step {ckpt.step}")
    pointer = {"format": POINTER_FORMAT, "url": store.url, "manifest": raw.decode("utf-8"),
               "size": m.size, "objects": {f: store.show(store.object_path(e)) for f, e in files.items()}}
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".record-", dir=scratch))
    final = tmp.with_name(tmp.name.replace(".record-", "record-"))
    record = replace(m, format_version=1, world_size=None)
    return commit_staged(tmp, final, {}, read_state(ckpt.path), {POINTER: pointer}, record)


def forget(stored: Stored, settings: Settings) -> None:
    """After ``stored`` was deleted from its tracker: remove its manifest from the bucket's
    records and the objects no other version references."""
    url = storage_url(settings)
    if url is None:
        return
    store = _store(settings, url)
    key = _record_key(store, stored.run.backend, stored.run.project, stored.run.run_id, stored.step, stored.created)
    store.release(key)


def _pointer(record: LocalCheckpoint) -> dict[str, Any]:
    where = record.path / POINTER
    data = load_json(where.read_bytes(), where)
    if not isinstance(data, dict) or data.get("format") != POINTER_FORMAT or not isinstance(data.get("manifest"), str) \
            or not isinstance(data.get("url"), str):
        raise IntegrityError(f"{where}: not a ckpt_track object pointer; the record is damaged")
    return data


def materialize(record: LocalCheckpoint, settings: Settings, dest: Path) -> LocalCheckpoint:
    """The full checkpoint a record points at, downloaded from the bucket into ``dest`` (a cache
    entry reused when verified).  The bucket is the configured ``[storage] url``, else the one the
    record names."""
    verify(record.path)  # the pointer itself must be intact before anything is fetched by it
    data = _pointer(record)
    raw = data["manifest"].encode("utf-8")
    manifest = parse_manifest(raw, f"{record.path / POINTER} (manifest)")
    url = storage_url(settings) or data["url"]
    if not is_url(url):
        raise IntegrityError(f"{record.path / POINTER}: names {url!r}, which is not an object-store URL")
    store = _store(settings, url)
    files = {f: e for f, e in manifest.files.items() if f != MANIFEST}

    def own(into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        (into / MANIFEST).write_bytes(raw)
        names = [f for f in files if not is_blob(f)]
        store.download({store.object_path(files[f]): into / f for f in names}, f"step {manifest.step}")

    def blobs(names: Any, into: Path) -> None:
        store.download({store.object_path(files[f]): into / f for f in names}, f"step {manifest.step}",
                       sum(files[f].size for f in names))

    return cache.fetch(Path(dest), own, blobs, manifest_hash=xxhash.xxh3_128(raw).hexdigest(),
                       where=f"{url} (step {manifest.step})")
