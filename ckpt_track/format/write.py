"""Writing a new checkpoint: tensors, ``state.json``, then the manifest, published atomically.

Every file is fsynced in a hidden staging directory and the manifest, the commit,
is written last; the directory is then renamed into place.  A crash or an error at
any point leaves no directory that looks like a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import save_file

from .atomic import now_iso, publish, staging
from .copy import copy_one, reusable
from .hashing import PACK_SIZE, blob_groups, blob_name, content_digest, hash_file
from .manifest import MANIFEST, STATE, FileEntry, LocalCheckpoint, Manifest, canonical_json, parse_manifest
from .modes import seal
from .serialize import Prepared, prepare, write_prepared

_METADATA = {"format": "pt"}


def write_checkpoint(
    parent: Path,
    name: str,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    step: int,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    lineage: Mapping[str, Any] | None = None,
    shard_size: int = 2 * 1024**3,
    blobs: bool = False,
    pack_size: int = PACK_SIZE,
    reuse: Iterable[LocalCheckpoint] = (),
    before_commit: Callable[[], None] | None = None,
) -> LocalCheckpoint:
    """Write a checkpoint to ``parent/name`` atomically and return it.

    ``tensors`` must be contiguous CPU tensors that share no memory.  Fails with
    ``FileExistsError`` if ``parent/name`` already exists (never clobbers).

    With ``blobs=True`` tensors go to content-addressed files (see the package
    docstring); a file whose name is already in one of the ``reuse`` checkpoints
    is hard-linked (or copied) from there instead of serialized again.

    ``before_commit`` is called once every file is written, before the manifest: raising
    there abandons the checkpoint (nothing is published).
    """
    reuse = list(reuse)
    with staging(parent, name) as (tmp, final):
        if blobs:
            files = _write_blobs(tmp, tensors, pack_size, reuse)
        else:
            files = _write_shards(tmp, tensors, shard_size)
        files[STATE] = _write_state(tmp, state)
        if before_commit is not None:
            before_commit()
        manifest = Manifest(step=step, epoch=epoch, created=now_iso(), metrics=dict(metrics or {}),
                            lineage=dict(lineage or {}), files=files)
        manifest = _write_manifest(tmp, final, manifest)
        seal(tmp)  # committed: never changed in place again, so it may be hard-linked anywhere
        publish(tmp, final)
    return LocalCheckpoint(final, manifest)


def _write_blobs(tmp: Path, tensors: Mapping[str, torch.Tensor], pack_size: int,
                 reuse: Iterable[LocalCheckpoint], placed: dict[str, str] | None = None) -> dict[str, FileEntry]:
    """One content-addressed file per tensor group, linked from a ``reuse`` checkpoint that
    already holds it (an unchanged group), else serialized.  ``placed`` receives, when given,
    the file each tensor went to."""
    files: dict[str, FileEntry] = {}
    written: list[Path] = []
    for group in blob_groups(tensors, pack_size):
        prepared = _prepare(tensors, group)  # one pass over the bytes: the file's hash, which names it
        fname = blob_name(prepared.file_hash if prepared is not None else content_digest(tensors, group))
        if placed is not None:
            placed.update(dict.fromkeys(group, fname))
        if fname in files:
            continue  # cannot happen for distinct names; kept for safety
        found = reusable(fname, reuse)
        if found is not None:
            copy_one(found[0], tmp / fname, link=True, expected=found[1].size)
            files[fname] = found[1]
        else:
            files[fname] = _save(tmp / fname, {k: tensors[k] for k in group}, sync=False, prepared=prepared)
            written.append(tmp / fname)
    _fsync_all(written)
    return files


def _fsync_all(paths: list[Path]) -> None:
    """Make freshly written files durable: their fsyncs overlap (one journal commit can cover
    several), instead of one full round trip to the disk per file."""
    if len(paths) <= 1:
        for p in paths:
            _fsync_file(p)
        return
    with ThreadPoolExecutor(max_workers=min(8, len(paths)), thread_name_prefix="ckpt_track-fsync") as pool:
        list(pool.map(_fsync_file, paths))


def write_blobs(tmp: Path, tensors: Mapping[str, torch.Tensor], *, reuse: Iterable[LocalCheckpoint] = (),
                pack_size: int = PACK_SIZE) -> tuple[dict[str, FileEntry], dict[str, str]]:
    """Content-addressed tensor files into the staging directory ``tmp`` (one rank's part of a
    sharded checkpoint): ``(files, file of each tensor)``; a file a ``reuse`` checkpoint holds
    is linked, not written."""
    placed: dict[str, str] = {}
    return _write_blobs(tmp, tensors, pack_size, list(reuse), placed), placed


def commit_staged(tmp: Path, final: Path, files: Mapping[str, FileEntry], state: Mapping[str, Any],
                  json_files: Mapping[str, Any], manifest: Manifest) -> LocalCheckpoint:
    """Finish a checkpoint other writers filled with tensor files (every rank of a sharded
    save): write ``state.json`` and ``json_files``, then the manifest listing them all (the
    commit), and publish ``tmp`` as ``final``.  ``manifest.files`` is replaced."""
    entries = dict(files)
    entries[STATE] = _write_state(tmp, state)
    for name, data in json_files.items():
        raw = canonical_json(data)
        _write_bytes(tmp / name, raw)
        entries[name] = FileEntry(len(raw), xxhash.xxh3_128(raw).hexdigest())
    done = _write_manifest(tmp, final, replace(manifest, files=entries))
    seal(tmp)
    publish(tmp, final)
    return LocalCheckpoint(final, done)


def _write_shards(tmp: Path, tensors: Mapping[str, torch.Tensor], shard_size: int) -> dict[str, FileEntry]:
    """Tensors in ``tensors-<i>-of-<n>.safetensors`` shards of about ``shard_size`` bytes."""
    files: dict[str, FileEntry] = {}
    shards = _shards(tensors, shard_size)
    for i, shard in enumerate(shards, 1):
        fname = f"tensors-{i:05d}-of-{len(shards):05d}.safetensors"
        files[fname] = _save(tmp / fname, dict(shard))
    return files


def _shards(tensors: Mapping[str, torch.Tensor], shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Greedy sharding in key order; a tensor larger than the limit gets its own shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > shard_size:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    return shards if shards[0] else []


def _prepare(tensors: Mapping[str, torch.Tensor], names: list[str]) -> Prepared | None:
    """The named tensors laid out as one safetensors file, its hash computed; None when a
    dtype has no name in this writer (then safetensors writes the file, named by the group's
    content digest as before)."""
    try:
        return prepare(tensors, names, metadata=_METADATA)
    except TypeError:
        return None


def _save(path: Path, tensors: dict[str, torch.Tensor], *, sync: bool = True,
          prepared: Prepared | None = None) -> FileEntry:
    """Serialize tensors to a safetensors file, fsync it (unless the caller does, ``sync=False``),
    and describe it for the manifest: written and hashed in one pass (``ckpt_track.format.serialize``),
    or by safetensors for a dtype that writer does not name."""
    if prepared is None:
        prepared = _prepare(tensors, list(tensors))
    if prepared is not None:
        return write_prepared(path, prepared, sync=sync)
    save_file(tensors, str(path), metadata=_METADATA)
    if sync:
        _fsync_file(path)
    return FileEntry(path.stat().st_size, hash_file(path))


def _write_state(tmp: Path, state: Mapping[str, Any]) -> FileEntry:
    data = canonical_json(state)
    _write_bytes(tmp / STATE, data)
    return FileEntry(len(data), xxhash.xxh3_128(data).hexdigest())


def _write_manifest(tmp: Path, final: Path, manifest: Manifest) -> Manifest:
    """Write the manifest (the commit) and return it as a reader will get it back, digest
    included: parsed from the very bytes written."""
    raw = canonical_json(manifest.to_json())
    manifest = parse_manifest(raw, str(final / MANIFEST))
    _write_bytes(tmp / MANIFEST, raw)
    return manifest


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))  # never opened for writing: it may be sealed
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
