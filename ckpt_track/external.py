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

import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from . import cache
from .config import STORAGE_SECTION, Settings
from .errors import (
    AuthError,
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
    IntegrityError,
)
from .format import MANIFEST, LocalCheckpoint, commit_staged, is_blob, parse_manifest, read_state, verify
from .format.files import load_json
from .objstore import ObjectStore, is_url
from .records import Stored
from .replicas import copies, open_store

__all__ = [
    "POINTER",
    "complete",
    "externalize",
    "forget",
    "from_pointer",
    "is_record",
    "materialize",
    "materialize_manifest",
    "pointer_of",
    "register",
    "seal",
    "storage_url",
    "verify_copies",
]

log = logging.getLogger("ckpt_track")
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


def _record_key(store: ObjectStore, backend: str, project: str, run_id: str, step: int, created: str) -> str:
    name = _SAFE.sub("_", f"{step}-{created}")
    return store.path("records", _SAFE.sub("_", backend), _SAFE.sub("_", project), _SAFE.sub("_", run_id),
                      f"{name}.json")


def is_record(ckpt: LocalCheckpoint) -> bool:
    return POINTER in ckpt.manifest.files


def objects_of(ckpt: LocalCheckpoint) -> dict[str, tuple[str, int, str]] | None:
    """For a backend that shows a record's files natively (as references to the bucket): each
    file of the checkpoint -> (object URL, size, xxh3-128); None for an ordinary checkpoint."""
    if not is_record(ckpt):
        return None
    data = _pointer(ckpt)
    manifest = parse_manifest(data["manifest"].encode("utf-8"), f"{ckpt.path / POINTER} (manifest)")
    urls = data.get("objects") if isinstance(data.get("objects"), dict) else {}
    return {f: (str(urls.get(f, "")), e.size, e.hash) for f, e in manifest.files.items() if f != MANIFEST and urls.get(f)}


def externalize(ckpt: LocalCheckpoint, settings: Settings, url: str, backend: str, project: str,
                run_id: str, scratch: Path) -> tuple[LocalCheckpoint, str]:
    """Upload ``ckpt``'s files to the bucket and return the record to hand to ``backend`` (a
    directory under ``scratch``; the caller removes it) and its manifest's key in the bucket."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".record-", dir=scratch))
    try:
        record = seal(ckpt, settings, url, tmp, tmp.with_name(tmp.name.replace(".record-", "record-")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # published (renamed) on success: only a failed one is left
    try:
        return record, register(record, settings, backend, project, run_id, ckpt.path)
    except BaseException:
        shutil.rmtree(record.path, ignore_errors=True)
        raise


def seal(ckpt: LocalCheckpoint, settings: Settings, url: str, tmp: Path, final: Path) -> LocalCheckpoint:
    """Upload the files of ``ckpt`` this machine holds (the other ranks of a sharded save send
    their own), check that the bucket has every file the manifest names, and commit the record
    at ``final`` (staged in ``tmp``)."""
    store = open_store(settings, url)
    store.check()
    where = f"checkpoint step {ckpt.step}"
    files = {f: e for f, e in ckpt.manifest.files.items() if f != MANIFEST}
    here = {f for f in files if (ckpt.path / f).is_file()}
    store.upload({store.object_path(files[f]): ckpt.path / f for f in here}, where)
    elsewhere = {store.object_path(e): e.size for f, e in files.items() if f not in here}
    missing = [p for p, size in store.sizes(list(elsewhere)).items() if size != elsewhere[p]]
    if missing:
        raise CheckpointWriteError(f"{where}: {len(missing)} file(s) another rank should have sent are not in "
                                   f"{store.url} (e.g. {store.show(missing[0])}); the checkpoint was not committed")
    raw = (ckpt.path / MANIFEST).read_bytes()
    m = ckpt.manifest
    pointer = {"format": POINTER_FORMAT, "url": store.url, "manifest": raw.decode("utf-8"),
               "size": m.size, "objects": {f: store.show(store.object_path(e)) for f, e in files.items()}}
    # every tracker shows a checkpoint's lineage (MLflow as tags, the others as metadata): say there
    # where the files are and how large the checkpoint really is
    lineage = {**m.lineage, "storage": store.url, "storage_size": m.size}
    record = replace(m, format_version=1, world_size=None, lineage=lineage)
    return commit_staged(tmp, final, {}, read_state(ckpt.path), {POINTER: pointer}, record)


def register(record: LocalCheckpoint, settings: Settings, backend: str, project: str, run_id: str,
             source: Path | None = None) -> str:
    """Write the full manifest of ``record`` under ``records/`` of its bucket (what keeps its
    objects alive for ``gc``, one per tracker version); returns that key, relative to the prefix.
    Then re-check the objects, which the manifest now protects: one a concurrent delete removed
    is sent again from ``source`` (the checkpoint on disk), or the put fails."""
    data = _pointer(record)
    raw = data["manifest"].encode("utf-8")
    m = parse_manifest(raw, f"{record.path / POINTER} (manifest)")
    store = open_store(settings, storage_url(settings) or data["url"])
    key = _record_key(store, backend, project, run_id, m.step, m.created)
    store.write(key, raw, "the record's manifest")
    files = {f: e for f, e in m.files.items() if f != MANIFEST}
    sizes = store.sizes([store.object_path(e) for e in files.values()])
    gone = {f: e for f, e in files.items() if sizes[store.object_path(e)] != e.size}
    if gone and source is not None and all((source / f).is_file() for f in gone):
        store.upload({store.object_path(e): source / f for f, e in gone.items()}, f"checkpoint step {m.step}")
    elif gone:
        raise CheckpointWriteError(f"checkpoint step {m.step}: {len(gone)} of its objects vanished from {store.url} "
                                   "(a concurrent delete); it was not stored")
    return key[len(store.root) + 1:]


def forget(stored: Stored, settings: Settings) -> None:
    """After ``stored`` was deleted from its tracker: remove its manifest from the bucket's
    records and the objects no other version references."""
    url = storage_url(settings)
    if url is None:
        return
    for i, where in enumerate(copies(settings, url)):
        store = open_store(settings, where)
        key = _record_key(store, stored.run.backend, stored.run.project, stored.run.run_id, stored.step,
                          stored.created)
        try:
            store.release(key)
        except CkptTrackError:
            if i == 0:
                raise
            log.warning("ckpt_track: could not release %s in the replica %s (left to its gc)", key, where)


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
    data = pointer_of(record)
    return materialize_manifest(data["manifest"].encode("utf-8"), data["url"], settings, dest)


def pointer_of(record: LocalCheckpoint) -> dict[str, Any]:
    """The record's ``objects.json`` (the full manifest and the URL), the record verified first."""
    verify(record.path)  # the pointer itself must be intact before anything is fetched by it
    return _pointer(record)


def materialize_manifest(raw: bytes, named: str, settings: Settings, dest: Path) -> LocalCheckpoint:
    """The checkpoint of the full manifest ``raw`` downloaded into ``dest`` from the first copy
    that verifies: the configured ``[storage] url`` (else ``named``, the record's), then each
    replica."""
    manifest = parse_manifest(raw, f"the manifest of a record in {named}")
    first = storage_url(settings) or named
    if not is_url(first):
        raise IntegrityError(f"a record names {first!r}, which is not an object-store URL")
    failures: list[tuple[str, CkptTrackError]] = []
    for where in copies(settings, first):
        try:
            got = _fetch_copy(open_store(settings, where), raw, manifest, Path(dest))
        except (BackendUnavailable, IntegrityError, AuthError, CheckpointNotFound) as exc:
            failures.append((where, exc))
            shutil.rmtree(dest, ignore_errors=True)  # a copy that did not verify is not kept
            continue
        if failures:
            log.warning("ckpt_track: step %s restored from the replica %s (%s)", manifest.step, where,
                        "; ".join(f"{w}: {e}" for w, e in failures))
        return got
    if len(failures) == 1:
        raise failures[0][1]
    raise IntegrityError(f"no copy of step {manifest.step} could be restored: "
                         + "; ".join(f"{w}: {e}" for w, e in failures)) from failures[-1][1]


def _fetch_copy(store: ObjectStore, raw: bytes, manifest: Any, dest: Path) -> LocalCheckpoint:
    """The checkpoint from one copy, every byte verified (a copy whose bytes differ is refused)."""
    files = {f: e for f, e in manifest.files.items() if f != MANIFEST}

    def own(into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        (into / MANIFEST).write_bytes(raw)
        names = [f for f in files if not is_blob(f)]
        store.download({store.object_path(files[f]): into / f for f in names}, f"step {manifest.step}")

    def blobs(names: Any, into: Path) -> None:
        store.download({store.object_path(files[f]): into / f for f in names}, f"step {manifest.step}",
                       sum(files[f].size for f in names))

    got = cache.fetch(dest, own, blobs, manifest_hash=xxhash.xxh3_128(raw).hexdigest(),
                      where=f"{store.url} (step {manifest.step})")
    verify(got.path, got.manifest)
    return got


def verify_copies(record: LocalCheckpoint, settings: Settings, scratch: Path) -> list[tuple[str, str | None]]:
    """Download and verify the checkpoint from each copy in turn (the first, then each replica):
    ``(url, None)`` for a copy that verifies, ``(url, what is wrong)`` otherwise."""
    data = pointer_of(record)
    raw = data["manifest"].encode("utf-8")
    manifest = parse_manifest(raw, f"{record.path / POINTER} (manifest)")
    out: list[tuple[str, str | None]] = []
    for i, where in enumerate(copies(settings, storage_url(settings) or data["url"])):
        dest = Path(scratch) / f"copy-{i}"
        try:
            _fetch_copy(open_store(settings, where), raw, manifest, dest)
            out.append((where, None))
        except CkptTrackError as exc:
            out.append((where, str(exc)))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    return out


def complete(record: LocalCheckpoint, settings: Settings) -> LocalCheckpoint:
    """A record's checkpoint, fetched from the bucket into the cache (keyed by its manifest)."""
    return from_pointer(pointer_of(record), settings)


def from_pointer(pointer: Mapping[str, Any], settings: Settings) -> LocalCheckpoint:
    """The checkpoint of a record's pointer (``manifest`` and ``url``), fetched into the cache."""
    raw = str(pointer["manifest"]).encode("utf-8")
    dest = cache.cache_dir() / "objects" / xxhash.xxh3_128(raw).hexdigest()
    return materialize_manifest(raw, str(pointer["url"]), settings, dest)
