"""Checkpoint format v1: a directory of safetensors shards, ``state.json`` and
``manifest.json``.

``manifest.json`` is written last and is the commit: a directory without a
valid manifest is not a checkpoint.  It records the format version, step,
epoch, creation time, metrics, lineage, and the size and xxh3-128 hash of every
other file.  Loading never unpickles: tensors come from safetensors, the rest
from JSON.

Checkpoints are published atomically: written into a hidden temporary sibling
directory, fsynced, then renamed into place.

Incremental (content-addressed) layout: with ``blobs=True`` tensors are grouped
(a tensor of ``pack_size`` bytes or more alone, smaller ones packed together in
name order) and each group is written to ``t-<digest>.safetensors``, where the
digest is the xxh3-128 of the group's names, dtypes, shapes and bytes.  Equal
names mean equal contents, so a group that did not change since an earlier
checkpoint is hard-linked from it instead of being written again, and a backend
can store each such file once per run (:func:`is_blob`).  The directory is still
a plain v1 checkpoint: any v1 reader loads it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .errors import CheckpointNotFound, IntegrityError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "STATE",
    "FileEntry",
    "LocalCheckpoint",
    "Manifest",
    "blob_groups",
    "content_digest",
    "hash_file",
    "is_blob",
    "is_checkpoint",
    "load_checkpoint",
    "publish",
    "read_manifest",
    "verify",
    "write_checkpoint",
]

FORMAT_VERSION = 1
FORMAT_NAME = "ckpt_track"
MANIFEST = "manifest.json"
STATE = "state.json"
HASH_ALGORITHM = "xxh3-128"
_CHUNK = 8 * 1024 * 1024
TMP_PREFIX = ".tmp-"
PACK_SIZE = 1024 * 1024  # tensors below this are packed together into files up to this size
_BLOB_RE = re.compile(r"^t-[0-9a-f]{32}\.safetensors$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_MANIFEST_BYTES = 64 * 1024**2  # a manifest lists files: far below this unless damaged or hostile
MAX_STATE_BYTES = 256 * 1024**2
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself applies to a header
MAX_JSON_DEPTH = 200  # nesting of a manifest, state.json or header; ckpt_track writes far less
_MAX_DIM = 2**48
# keys of a manifest written before manifests carried their own digest (legacy v1)
_LEGACY_KEYS = frozenset({"format", "format_version", "step", "epoch", "created", "metrics", "lineage",
                          "hash_algorithm", "files"})
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


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
    #: xxh3-128 of the manifest's canonical JSON without this key (None: a legacy manifest)
    manifest_hash: str | None = field(default=None, compare=False)

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
        return {
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

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        """Build a manifest from parsed JSON, checking every field's type (the digest is
        checked by :func:`parse_manifest`, which reads the file's bytes)."""
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT_NAME:
                raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
            version = _count(data["format_version"], "format_version")
            if version > FORMAT_VERSION:
                raise IntegrityError(
                    f"{where}: checkpoint format v{version} is newer than this ckpt_track reads "
                    f"(v{FORMAT_VERSION}); upgrade: pip install -U ckpt-track"
                )
            digest = data.get("manifest_hash")
            if digest is None:
                unknown = sorted(set(data) - _LEGACY_KEYS)
                if unknown:  # a manifest without a digest has exactly the legacy keys
                    raise ValueError(f"unknown key(s) {unknown} in a manifest without 'manifest_hash'")
            elif not isinstance(digest, str) or not _DIGEST_RE.match(digest):
                raise ValueError(f"'manifest_hash' is {digest!r}, not a 32-digit hex digest")
            epoch = data.get("epoch")
            return cls(
                step=_count(data["step"], "step"),
                epoch=None if epoch is None else _count(epoch, "epoch"),
                created=_typed(data.get("created", ""), str, "created"),
                metrics={str(k): float(_number(v, f"metric {k!r}"))
                         for k, v in _typed(data.get("metrics") or {}, dict, "metrics").items()},
                lineage=dict(_typed(data.get("lineage") or {}, dict, "lineage")),
                hash_algorithm=_typed(data.get("hash_algorithm", HASH_ALGORITHM), str, "hash_algorithm"),
                files={check_name(k, where): _file_entry(k, v) for k, v in _typed(data["files"], dict, "files").items()},
                format_version=version,
                manifest_hash=digest,
            )
        except IntegrityError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IntegrityError(f"{where}: not a valid ckpt_track manifest ({exc}); the checkpoint is damaged") from exc


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{what!r} is {value!r}, expected a {kind.__name__}")
    return value


def _count(value: Any, what: str) -> int:
    """A non-negative int (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what!r} is {value!r}, expected a non-negative integer")
    return value


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, expected a number")
    return value


def _file_entry(name: Any, value: Any) -> FileEntry:
    entry = _typed(value, dict, f"files/{name}")
    digest = _typed(entry["hash"], str, f"files/{name}/hash")
    return FileEntry(_count(entry["size"], f"files/{name}/size"), digest)


def manifest_digest(body: Mapping[str, Any]) -> str:
    """xxh3-128 of the canonical JSON of a manifest without its ``manifest_hash``."""
    return xxhash.xxh3_128(_json_bytes(dict(body))).hexdigest()


@dataclass(frozen=True)
class LocalCheckpoint:
    """A committed checkpoint directory on local disk."""

    path: Path
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def size(self) -> int:
        return self.manifest.size


# -- hashing -------------------------------------------------------------------
def _hasher() -> Any:
    return xxhash.xxh3_128()


def hash_file(path: Path) -> str:
    """xxh3-128 of a regular file (never through a link; see :func:`open_regular`)."""
    with open_regular(Path(path)) as f:
        return hash_open(f, os.fstat(f.fileno()).st_size)


def hash_open(f: BinaryIO, size: int) -> str:
    """xxh3-128 of the first ``size`` bytes of an open file (at most ``size`` are read; a file
    that ends before raises :class:`OSError`).  Large files go through a read-only memory map
    (no copy out of the page cache; about twice as fast when cached), small ones in 8 MiB chunks."""
    h = _hasher()
    if size >= _CHUNK:
        try:
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
                if hasattr(m, "madvise"):
                    m.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(m)
                try:
                    for off in range(0, size, _CHUNK * 8):
                        h.update(view[off:off + _CHUNK * 8])
                finally:
                    view.release()
            return h.hexdigest()
        except (OSError, ValueError):  # cannot map this file (or it is shorter): read it instead
            h = _hasher()
    f.seek(0)
    for chunk in _chunks(f, size, lambda left: OSError(errno.EIO, f"file ended {left} bytes before its "
                                                                  f"recorded size {size}")):
        h.update(chunk)
    return h.hexdigest()


# -- opening files that may be hostile -----------------------------------------------
def check_name(fname: Any, where: Path | str) -> str:
    """A manifest's file name must be a plain name inside the checkpoint directory (the
    format writes flat names only): no ``/``, no NUL byte, not ``.`` or ``..``."""
    if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\0" in fname \
            or os.path.isabs(fname):
        raise IntegrityError(
            f"{where}: manifest entry {fname!r} escapes the checkpoint directory (only plain file "
            "names are allowed); the manifest is damaged or hostile: do not use this checkpoint"
        )
    return fname


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, limit: int | None = None) -> BinaryIO:
    """Open a checkpoint file for reading: never through a symbolic link (``O_NOFOLLOW``),
    never blocking on a FIFO (``O_NONBLOCK``, cleared once open), and only a regular file
    (:class:`IntegrityError` otherwise, or when it is larger than ``limit`` bytes)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise IntegrityError(
                f"{path} is a symbolic link; a checkpoint holds regular files only, so links are never "
                "followed: replace it by a copy of the file, or use another checkpoint"
            ) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{path} is {_kind(st.st_mode)}; a checkpoint holds regular files only: "
                                 "use another checkpoint or restore this file")
        if limit is not None and st.st_size > limit:
            raise IntegrityError(f"{path} is {st.st_size} bytes, more than the {limit} a valid one can be; "
                                 "the checkpoint is damaged or hostile")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_exact(f: BinaryIO, size: int, where: Path | str, offset: int = 0) -> bytes:
    """Exactly ``size`` bytes from ``offset`` (never more); :class:`IntegrityError` if the file ends first."""
    f.seek(offset)
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            raise IntegrityError(f"{where} ended after {got} of {size} bytes (truncated); the checkpoint is damaged")
        got += n
    return bytes(buf)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _too_deep(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def load_json(raw: bytes, where: Path | str) -> Any:
    """Parse JSON from a checkpoint file: duplicate keys, nesting deeper than
    ``MAX_JSON_DEPTH`` and invalid text are an :class:`IntegrityError`."""
    try:
        data = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise IntegrityError(f"{where}: JSON nested too deeply; the file is damaged or hostile") from exc
    except ValueError as exc:  # also UnicodeDecodeError and a too long integer literal
        raise IntegrityError(f"{where} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    if isinstance(data, (dict, list)) and _too_deep(data, MAX_JSON_DEPTH):
        raise IntegrityError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; the file is damaged or hostile")
    return data


# -- writing -------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode()


def is_blob(fname: str) -> bool:
    """True for a content-addressed tensor file (``t-<digest>.safetensors``): the same
    name always holds the same bytes, so a backend may store it once per run."""
    return bool(_BLOB_RE.match(fname))


def blob_groups(tensors: Mapping[str, torch.Tensor], pack_size: int = PACK_SIZE) -> list[list[str]]:
    """Tensor names grouped into files: a tensor of ``pack_size`` bytes or more alone,
    smaller ones packed in name order into groups of at most ``pack_size`` bytes."""
    groups: list[list[str]] = []
    small: list[str] = []
    used = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if nbytes >= pack_size:
            groups.append([name])
            continue
        if small and used + nbytes > pack_size:
            groups.append(small)
            small, used = [], 0
        small.append(name)
        used += nbytes
    if small:
        groups.append(small)
    return groups


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()) if flat.dtype != torch.uint8 else memoryview(flat.numpy())


def content_digest(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> str:
    """xxh3-128 of the named tensors' names, dtypes, shapes and bytes (what a group's file holds)."""
    h = _hasher()
    for name in names:
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_raw(t))
    return h.hexdigest()


def link_cached(dest: Path, manifest: Manifest, names: Iterable[str], entry: Path) -> list[str]:
    """Hard-link (or copy) into ``dest`` each named content-addressed file that another version
    of the same run in the download cache (a ``v*`` sibling of the cache ``entry`` being filled)
    holds with the size and hash ``manifest`` records; returns the names still to download."""
    entry = Path(entry)
    siblings = [d for d in entry.parent.glob("v*") if d.is_dir() and d != entry] if entry.parent.is_dir() else []
    held: dict[str, Path] = {}
    for sib in siblings:
        try:
            other = read_manifest(sib)
        except (CheckpointNotFound, IntegrityError, OSError):
            continue
        if other.hash_algorithm != manifest.hash_algorithm:
            continue
        for fname, entry in other.files.items():
            if is_blob(fname) and fname not in held and manifest.files.get(fname) == entry:
                held[fname] = sib / fname
    missing = []
    for fname in names:
        src = held.get(fname)
        try:  # hashing a cached file is far cheaper than downloading it, and a damaged one is skipped
            if src is None or not _regular_of_size(src, manifest.files[fname].size) or \
                    hash_file(src) != manifest.files[fname].hash:
                raise FileNotFoundError(fname)
            _copy_one(src, Path(dest) / check_name(fname, dest), link=True, expected=manifest.files[fname].size)
        except (OSError, IntegrityError):
            missing.append(fname)
    return missing


def _reusable(fname: str, reuse: Iterable[LocalCheckpoint]) -> tuple[Path, FileEntry] | None:
    for ckpt in reuse:
        entry = ckpt.manifest.files.get(fname)
        if entry is not None:
            src = ckpt.path / fname
            if _regular_of_size(src, entry.size):
                return src, entry
    return None


def _regular_of_size(path: Path, size: int) -> bool:
    """True when ``path`` itself (not a link's target) is a regular file of ``size`` bytes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


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
) -> LocalCheckpoint:
    """Write a checkpoint to ``parent/name`` atomically and return it.

    ``tensors`` must be contiguous CPU tensors that share no memory.  Fails with
    ``FileExistsError`` if ``parent/name`` already exists (never clobbers).

    With ``blobs=True`` tensors go to content-addressed files (see the module
    docstring); a file whose name is already in one of the ``reuse`` checkpoints
    is hard-linked (or copied) from there instead of serialized again.
    """
    reuse = list(reuse)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    if final.exists():
        raise FileExistsError(f"checkpoint directory {final} already exists")
    tmp = parent / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, FileEntry] = {}
        if blobs:
            for group in blob_groups(tensors, pack_size):
                fname = f"t-{content_digest(tensors, group)}.safetensors"
                if fname in files:
                    continue  # cannot happen for distinct names; kept for safety
                found = _reusable(fname, reuse)
                if found is not None:
                    _copy_one(found[0], tmp / fname, link=True, expected=found[1].size)
                    files[fname] = found[1]
                    continue
                save_file({k: tensors[k] for k in group}, str(tmp / fname), metadata={"format": "pt"})
                _fsync_file(tmp / fname)
                files[fname] = FileEntry((tmp / fname).stat().st_size, hash_file(tmp / fname))
        else:
            shards = _shards(tensors, shard_size)
            for i, shard in enumerate(shards, 1):
                fname = f"tensors-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(dict(shard), str(tmp / fname), metadata={"format": "pt"})
                _fsync_file(tmp / fname)
                files[fname] = FileEntry((tmp / fname).stat().st_size, hash_file(tmp / fname))
        data = _json_bytes(state)
        _write_bytes(tmp / STATE, data)
        files[STATE] = FileEntry(len(data), xxhash.xxh3_128(data).hexdigest())
        manifest = Manifest(
            step=step,
            epoch=epoch,
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            metrics=dict(metrics or {}),
            lineage=dict(lineage or {}),
            files=files,
        )
        raw = _json_bytes(manifest.to_json())
        manifest = parse_manifest(raw, str(final / MANIFEST))  # what a reader gets back, digest included
        _write_bytes(tmp / MANIFEST, raw)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LocalCheckpoint(final, manifest)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written, fsynced directory into place (atomic on POSIX)."""
    fsync_dir(tmp)
    os.rename(tmp, final)  # fails if final exists and is non-empty: no clobbering
    fsync_dir(final.parent)


def copy_checkpoint(src: LocalCheckpoint, parent: Path, name: str, *, link: bool = True,
                    progress: Any = None, sources: Mapping[str, Path] | None = None) -> LocalCheckpoint:
    """Copy (or hard-link when ``link`` and on the same filesystem) a checkpoint,
    manifest last, publishing atomically.  ``progress(nbytes)`` is called as bytes move.
    ``sources`` names another file with the same contents to take a file from (a
    content-addressed tensor file already in the destination store)."""
    sources = sources or {}
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    if final.exists():
        raise FileExistsError(f"checkpoint directory {final} already exists")
    tmp = parent / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, entry in src.manifest.files.items():
            check_name(fname, src.path)
            _copy_one(sources.get(fname, src.path / fname), tmp / fname, link=link, expected=entry.size)
            if progress is not None:
                progress(entry.size)
        _copy_one(src.path / MANIFEST, tmp / MANIFEST, link=False, limit=MAX_MANIFEST_BYTES)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LocalCheckpoint(final, src.manifest)


def _copy_one(src: Path, dst: Path, *, link: bool, expected: int | None = None, limit: int | None = None) -> None:
    """Hard-link or copy one regular file (never a link's target; see :func:`open_regular`),
    of exactly ``expected`` bytes when given, else of at most ``limit``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open_regular(src, limit) as f:
        st = os.fstat(f.fileno())
        if expected is not None and st.st_size != expected:
            raise IntegrityError(f"{src}: size {st.st_size} bytes, manifest says {expected} (truncated or modified)")
        if link and _link_same(src, dst, st):
            return
        with open(dst, "wb") as out:
            _copy_bytes(f, out, st.st_size, src)
            out.flush()
            os.fsync(out.fileno())


def _link_same(src: Path, dst: Path, opened: os.stat_result) -> bool:
    """Hard-link ``src`` to ``dst`` if it is still the file that was opened (not swapped for a link)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return False  # other filesystem or no hard links: copy instead
    got = os.lstat(dst)
    if (got.st_dev, got.st_ino) == (opened.st_dev, opened.st_ino):
        return True
    os.unlink(dst)  # src was replaced after it was opened: copy what was opened instead
    return False


def _copy_bytes(f: BinaryIO, out: BinaryIO, size: int, where: Path) -> None:
    for chunk in _chunks(f, size, lambda left: IntegrityError(
            f"{where} ended {left} bytes early while being copied (truncated)")):
        out.write(chunk)


def _chunks(f: BinaryIO, size: int, short: Callable[[int], Exception]) -> Iterator[memoryview]:
    """The next ``size`` bytes of ``f`` in chunks of at most 8 MiB (one reused buffer: use each
    chunk before asking for the next); ``short(bytes_left)`` is raised if the file ends first."""
    buf = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buf)
    left = size
    while left:
        n = f.readinto(view[:min(left, len(buf))])
        if not n:
            raise short(left)
        yield view[:n]
        left -= n


# -- reading -------------------------------------------------------------------
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
    if _json_bytes(data) != raw or manifest_digest(body) != manifest.manifest_hash:
        raise IntegrityError(f"{where}: the manifest does not match its own manifest_hash (it was modified "
                             "or corrupted); do not use this checkpoint, restore another one")
    return manifest


def is_checkpoint(path: Path) -> bool:
    return _is_regular(Path(path) / MANIFEST) and not Path(path).name.startswith(TMP_PREFIX)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def verify(path: Path, manifest: Manifest | None = None, *,
           opened: Mapping[str, BinaryIO] | None = None) -> Manifest:
    """Re-hash every file against the manifest; raise :class:`IntegrityError` naming
    each missing, truncated, modified, linked or special file.  ``opened`` holds files
    already open (see :func:`open_files`): those are hashed, not reopened by name."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    if manifest.hash_algorithm != HASH_ALGORITHM:
        raise IntegrityError(f"{path}: unknown hash algorithm {manifest.hash_algorithm!r}")
    problems = [p for fname, entry in sorted(manifest.files.items())
                if (p := _file_problem(path, fname, entry, (opened or {}).get(fname)))]
    if problems:
        raise IntegrityError(
            f"checkpoint {path} failed verification; nothing was loaded:\n  " + "\n  ".join(problems)
        )
    return manifest


def _file_problem(path: Path, fname: str, entry: FileEntry, f: BinaryIO | None) -> str | None:
    """Why one file does not match its manifest entry, or None when it does."""
    try:
        check_name(fname, path)
    except IntegrityError:
        return f"{fname!r}: path escapes the checkpoint directory"
    try:
        with ExitStack() as stack:
            if f is None:
                f = stack.enter_context(open_regular(path / fname))
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                return f"{fname}: size {size} bytes, manifest says {entry.size} (truncated or modified)"
            if hash_open(f, entry.size) != entry.hash:
                return f"{fname}: content hash does not match the manifest (modified or corrupted)"
    except FileNotFoundError:
        return f"{fname}: missing"
    except IntegrityError as exc:
        return f"{fname}: {exc}"
    except OSError as exc:
        return f"{fname}: cannot be read ({exc.strerror or exc})"
    return None


def tensor_files(manifest: Manifest) -> Iterator[str]:
    return (f for f in sorted(manifest.files) if f.endswith(".safetensors"))


def open_files(path: Path, manifest: Manifest, stack: ExitStack) -> dict[str, BinaryIO]:
    """Open every file the manifest lists (regular files only, never through a link)."""
    return {fname: stack.enter_context(open_regular(Path(path) / check_name(fname, path)))
            for fname in sorted(manifest.files)}


def open_verified(path: Path, manifest: Manifest, stack: ExitStack, *, check: bool = True) -> dict[str, BinaryIO]:
    """Open every file of a checkpoint, then verify those open files (what is then read is
    what was verified, even if the version is deleted or renamed in between)."""
    try:
        files = open_files(path, manifest, stack)
    except (OSError, IntegrityError) as exc:
        verify(path, manifest)  # names every missing, unreadable or refused file
        raise IntegrityError(f"{path}: cannot open a checkpoint file ({exc})") from exc
    if check:
        verify(path, manifest, opened=files)
    return files


def load_checkpoint(path: Path, *, check: bool = True) -> tuple[Manifest, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify (unless ``check=False``) and load a checkpoint: manifest, tensors, state.

    Nothing is returned unless every file matches the manifest.
    """
    path = Path(path)
    with ExitStack() as stack:
        manifest = read_manifest(path)
        if check and manifest.hash_algorithm != HASH_ALGORITHM:
            raise IntegrityError(f"{path}: unknown hash algorithm {manifest.hash_algorithm!r}")
        files = open_verified(path, manifest, stack, check=check)
        tensor_fds = {f: files[f] for f in tensor_files(manifest)}
        tensors = load_into(path, tensor_fds, tensor_index(tensor_fds, path), {})
        if STATE not in files:
            raise IntegrityError(f"{path}: the manifest lists no {STATE}; the checkpoint is damaged")
        state = read_state_open(files[STATE], Path(path) / STATE)
    return manifest, tensors, state


def read_state(path: Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """The checkpoint's ``state.json`` (everything that is not a tensor), of the size the
    manifest records when given (else at most ``MAX_STATE_BYTES``)."""
    spath = Path(path) / STATE
    entry = manifest.files.get(STATE) if manifest is not None else None
    try:
        with open_regular(spath, MAX_STATE_BYTES) as f:
            if entry is not None and os.fstat(f.fileno()).st_size != entry.size:
                raise IntegrityError(f"{spath}: size differs from the manifest's {entry.size} bytes (modified)")
            return read_state_open(f, spath)
    except OSError as exc:
        raise IntegrityError(f"{spath}: cannot read ({exc})") from exc


def read_state_open(f: BinaryIO, where: Path) -> dict[str, Any]:
    """Parse an open ``state.json`` (at most ``MAX_STATE_BYTES``)."""
    size = os.fstat(f.fileno()).st_size
    if size > MAX_STATE_BYTES:
        raise IntegrityError(f"{where} is {size} bytes, more than the {MAX_STATE_BYTES} a valid one can be")
    state = load_json(read_exact(f, size, where), where)
    if not isinstance(state, dict):
        raise IntegrityError(f"{where}: not a JSON object")
    return state


# -- reading into existing tensors ------------------------------------------------------
_ST_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, dtype in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
    }.items() if dtype is not None
}
#: bits per element of every dtype a safetensors header may name (mapped above or not)
_ST_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8,
    "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "U16": 16, "U32": 32, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file (from its JSON header)."""

    name: str
    file: str
    dtype: torch.dtype | None  # None: a dtype this reader does not map (loaded through safetensors)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(f: BinaryIO, fname: str) -> list[TensorInfo]:
    """Parse and check a safetensors header (JSON; nothing is executed): every tensor's
    dtype, shape and byte range, which must lie inside the file, in order, without overlap,
    and hold exactly the bytes its dtype and shape need."""
    try:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(read_exact(f, 8, fname) if size >= 8 else b"", "little")
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = load_json(read_exact(f, n, fname, offset=8), fname)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        base = 8 + n
        out = [_tensor_info(fname, name, meta, base, size) for name, meta in header.items() if name != "__metadata__"]
        if not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("__metadata__ is not a JSON object")
        ranges = sorted((i.start, i.end) for i in out)
        if any(b < a_end for (_, a_end), (b, _) in zip(ranges, ranges[1:])):
            raise ValueError("tensor byte ranges overlap")
        return out
    except IntegrityError as exc:
        raise IntegrityError(f"{fname}: not a valid safetensors file ({exc})") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise IntegrityError(f"{fname}: not a valid safetensors file ({exc}); the checkpoint is damaged") from exc


def _tensor_info(fname: str, name: str, meta: Any, base: int, size: int) -> TensorInfo:
    """One header entry, checked: known dtype, sane shape, a byte range inside the file that
    holds exactly ``prod(shape)`` elements of the dtype."""
    if not isinstance(meta, dict):
        raise ValueError(f"tensor {name!r}: entry is not a JSON object")
    kind, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    bits = _ST_BITS.get(kind) if isinstance(kind, str) else None
    if bits is None:
        raise ValueError(f"tensor {name!r}: unknown dtype {kind!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < _MAX_DIM
                                              for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is invalid")
    if not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are invalid")
    begin, end = offsets
    if not 0 <= begin <= end or base + end > size:
        raise ValueError(f"tensor {name!r}: byte range {begin}-{end} lies outside the {size}-byte file")
    nbits = math.prod(shape) * bits
    if nbits % 8 or end - begin != nbits // 8:
        raise ValueError(f"tensor {name!r}: {end - begin} bytes do not hold {tuple(shape)} of {kind}")
    return TensorInfo(name, fname, _ST_DTYPES.get(kind), tuple(shape), base + begin, base + end)


def open_tensor_files(path: Path, manifest: Manifest, stack: ExitStack) -> dict[str, BinaryIO]:
    """Open every tensor file of a checkpoint (before verifying it: what is then read is what
    was verified, even if the version is deleted or renamed in between)."""
    return {fname: stack.enter_context(open_regular(Path(path) / check_name(fname, path)))
            for fname in tensor_files(manifest)}


def tensor_index(files: Mapping[str, BinaryIO], where: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint: name -> where it lies."""
    index: dict[str, TensorInfo] = {}
    for fname, f in sorted(files.items()):
        for info in read_header(f, fname):
            if info.name in index:
                raise IntegrityError(f"{where}: tensor {info.name!r} is stored twice ({index[info.name].file}, {fname})")
            index[info.name] = info
    return index


def _fits(t: torch.Tensor | None, info: TensorInfo) -> bool:
    return (t is not None and t.device.type == "cpu" and t.is_contiguous() and t.dtype == info.dtype
            and tuple(t.shape) == info.shape)


_PART_WAY = "tensors read before the failure were already loaded: restore again before training on"


def load_into(path: Path, files: Mapping[str, BinaryIO], index: Mapping[str, TensorInfo],
              targets: Mapping[str, torch.Tensor], *, part_way: str = _PART_WAY) -> dict[str, torch.Tensor]:
    """Load every tensor of a verified checkpoint: straight into the matching tensor of
    ``targets`` (CPU, contiguous, same dtype and shape) when there is one, else into a new
    tensor; one copy out of the page cache, no intermediate buffer.  A file holding a dtype
    this reader does not map is loaded through safetensors instead.

    Only the tensors of ``index`` are read (all of a file holding an unmapped dtype).  A read
    that fails part way raises :class:`IntegrityError` (``part_way`` says what it left);
    targets filled before it keep their new values (restore again)."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in index.values():
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, torch.Tensor] = {}
    try:
        for fname, infos in sorted(by_file.items()):
            if any(i.dtype is None for i in infos):
                out.update(_load_whole(files[fname], fname, {i.name for i in infos}))
                continue
            f = files[fname]
            for info in sorted(infos, key=lambda i: i.start):
                t = targets.get(info.name)
                if not _fits(t, info):
                    t = torch.empty(info.shape, dtype=info.dtype)
                view = _raw(t)
                f.seek(info.start)
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:got + _CHUNK * 8])
                    if not n:
                        raise OSError(f"{fname} ended inside tensor {info.name!r} (truncated)")
                    got += n
                out[info.name] = t
    except (OSError, SafetensorError, IntegrityError, KeyError, ValueError) as exc:
        raise IntegrityError(f"{path}: reading the checkpoint failed part way ({exc}); {part_way}") from exc
    return out


def _load_whole(f: BinaryIO, fname: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a file holding a dtype :func:`load_into` does not map, through
    safetensors from the bytes of the open (verified) file: never reopened by name."""
    data = read_exact(f, os.fstat(f.fileno()).st_size, fname)
    return {k: v for k, v in load_safetensors_bytes(data).items() if k in names}


def iter_files(ckpt: LocalCheckpoint) -> Iterable[tuple[str, int]]:
    """(file name, size) of every file including the manifest, manifest last."""
    for fname, entry in sorted(ckpt.manifest.files.items()):
        yield fname, entry.size
    yield MANIFEST, (ckpt.path / MANIFEST).stat().st_size


# -- atomic helpers shared by every store --------------------------------------------
def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds (what manifests and stores record)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def free_space(path: Path) -> str:
    """``"123.4 MiB free"`` on the disk holding ``path`` (for error messages)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def atomic_json(path: Path, data: Any, *, fix: str = "free disk space") -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary sibling, fsync, rename): a
    reader sees the old file or the new one, never a part.  ``CheckpointWriteError`` names the
    file, the free space and ``fix``."""
    from .errors import CheckpointWriteError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path} ({free_space(path.parent)}): {exc}; {fix}") from exc


def read_json_file(path: Path) -> dict[str, Any]:
    """A store's small JSON table (``run.json``, an alias table): ``{}`` when absent,
    ``IntegrityError`` naming the file when damaged or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is damaged: {exc}") from exc
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is damaged: not a JSON object")
    return data


def staged_dir(dest: Path) -> Path:
    """A new, empty hidden sibling of ``dest`` (``TMP_PREFIX``) to assemble a directory in
    before :func:`swap_in` puts it in place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def remove_dir(path: Path) -> None:
    """Remove a directory so that a half-removed one is never taken for a checkpoint: rename
    it to a hidden ``.deleting-*`` sibling first, then delete that."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def swap_in(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` (if any) by the staged directory ``tmp``; when a concurrent writer
    put a complete checkpoint at ``dest`` first, that one is kept and ``tmp`` removed."""
    if Path(dest).exists():
        remove_dir(dest)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (Path(dest) / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
