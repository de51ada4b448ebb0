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
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from . import cache
from .config import STORAGE_SECTION, Settings
from .errors import AuthError, BackendUnavailable, CheckpointNotFound, CkptTrackError, ConfigError, IntegrityError
from .format import MANIFEST, LocalCheckpoint, commit_staged, is_blob, parse_manifest, read_state, verify
from .format.files import load_json
from .objstore import ObjectStore, is_url
from .records import Stored
from .replicas import copies, open_store

__all__ = ["POINTER", "externalize", "forget", "is_record", "materialize", "storage_url", "verify_copies"]

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


def externalize(ckpt: LocalCheckpoint, settings: Settings, url: str, backend: str, project: str,
                run_id: str, scratch: Path) -> tuple[LocalCheckpoint, str]:
    """Upload ``ckpt``'s files to the bucket and return the record to hand to ``backend`` (a
    directory under ``scratch``; the caller removes it) and its manifest's key in the bucket."""
    store = open_store(settings, url)
    store.check()
    files = {f: e for f, e in ckpt.manifest.files.items() if f != MANIFEST}
    local = {store.object_path(e): ckpt.path / f for f, e in files.items()}
    _sent, found = store.upload(local, f"checkpoint step {ckpt.step}")
    raw = (ckpt.path / MANIFEST).read_bytes()
    m = ckpt.manifest
    key = _record_key(store, backend, project, run_id, m.step, m.created)
    store.write(key, raw, "the record's manifest")
    if found:  # as for a version of a bucket store: re-check shared objects once the manifest protects them
        store.upload({p: local[p] for p in found}, f"checkpoint step {ckpt.step}")
    pointer = {"format": POINTER_FORMAT, "url": store.url, "manifest": raw.decode("utf-8"),
               "size": m.size, "objects": {f: store.show(store.object_path(e)) for f, e in files.items()}}
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".record-", dir=scratch))
    final = tmp.with_name(tmp.name.replace(".record-", "record-"))
    record = replace(m, format_version=1, world_size=None)
    done = commit_staged(tmp, final, {}, read_state(ckpt.path), {POINTER: pointer}, record)
    return done, key[len(store.root) + 1:]


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
    verify(record.path)  # the pointer itself must be intact before anything is fetched by it
    data = _pointer(record)
    raw = data["manifest"].encode("utf-8")
    manifest = parse_manifest(raw, f"{record.path / POINTER} (manifest)")
    first = storage_url(settings) or data["url"]
    if not is_url(first):
        raise IntegrityError(f"{record.path / POINTER}: names {first!r}, which is not an object-store URL")
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
    verify(record.path)
    data = _pointer(record)
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
