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

import json
import math
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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

    @property
    def size(self) -> int:
        """Bytes of all files except the manifest itself."""
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
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
        try:
            if data.get("format") != FORMAT_NAME:
                raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise IntegrityError(
                    f"{where}: checkpoint format v{version} is newer than this ckpt_track reads "
                    f"(v{FORMAT_VERSION}); upgrade: pip install -U ckpt-track"
                )
            files = {str(k): FileEntry(int(v["size"]), str(v["hash"])) for k, v in data["files"].items()}
            return cls(
                step=int(data["step"]),
                epoch=None if data.get("epoch") is None else int(data["epoch"]),
                created=str(data.get("created", "")),
                metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
                lineage=dict(data.get("lineage") or {}),
                hash_algorithm=str(data.get("hash_algorithm", HASH_ALGORITHM)),
                files=files,
                format_version=version,
            )
        except IntegrityError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where}: not a valid ckpt_track manifest ({exc})") from exc


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
    """xxh3-128 of a file: large files through a read-only memory map (no copy out of the
    page cache; about twice as fast when the file is cached), small ones in 8 MiB chunks."""
    h = _hasher()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= _CHUNK:
            try:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if hasattr(m, "madvise"):
                        m.madvise(mmap.MADV_SEQUENTIAL)
                    view = memoryview(m)
                    try:
                        for off in range(0, size, _CHUNK * 8):
                            h.update(view[off:off + _CHUNK * 8])
                    finally:
                        view.release()
                return h.hexdigest()
            except (OSError, ValueError):  # cannot map this file: read it instead
                h = _hasher()
                f.seek(0)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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
        for fname, entry in other.files.items():
            if is_blob(fname) and fname not in held and manifest.files.get(fname) == entry:
                held[fname] = sib / fname
    missing = []
    for fname in names:
        src = held.get(fname)
        try:  # hashing a cached file is far cheaper than downloading it, and a damaged one is skipped
            if src is None or src.stat().st_size != manifest.files[fname].size or \
                    hash_file(src) != manifest.files[fname].hash:
                raise FileNotFoundError(fname)
            _copy_one(src, Path(dest) / fname, link=True)
        except OSError:
            missing.append(fname)
    return missing


def _reusable(fname: str, reuse: Iterable[LocalCheckpoint]) -> tuple[Path, FileEntry] | None:
    for ckpt in reuse:
        entry = ckpt.manifest.files.get(fname)
        if entry is not None:
            src = ckpt.path / fname
            try:
                if src.stat().st_size == entry.size:
                    return src, entry
            except OSError:
                continue
    return None


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
                    _copy_one(found[0], tmp / fname, link=True)
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
        _write_bytes(tmp / MANIFEST, _json_bytes(manifest.to_json()))
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
            _copy_one(sources.get(fname, src.path / fname), tmp / fname, link=link)
            if progress is not None:
                progress(entry.size)
        _copy_one(src.path / MANIFEST, tmp / MANIFEST, link=False)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LocalCheckpoint(final, src.manifest)


def _copy_one(src: Path, dst: Path, *, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # other filesystem or no hard links: copy instead
    shutil.copyfile(src, dst)
    _fsync_file(dst)


# -- reading -------------------------------------------------------------------
def read_manifest(path: Path) -> Manifest:
    """Read and validate ``path/manifest.json``.

    Raises :class:`CheckpointNotFound` when there is none (an uncommitted or
    foreign directory) and :class:`IntegrityError` when it is unreadable.
    """
    mpath = Path(path) / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"{path} is not a committed checkpoint (no {MANIFEST})") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{mpath} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    return Manifest.from_json(data, where=str(mpath))


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and not Path(path).name.startswith(TMP_PREFIX)


def verify(path: Path, manifest: Manifest | None = None) -> Manifest:
    """Re-hash every file against the manifest; raise :class:`IntegrityError` naming
    each missing, truncated or modified file."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    if manifest.hash_algorithm != HASH_ALGORITHM:
        raise IntegrityError(f"{path}: unknown hash algorithm {manifest.hash_algorithm!r}")
    problems: list[str] = []
    for fname, entry in sorted(manifest.files.items()):
        fpath = path / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            problems.append(f"{fname}: path escapes the checkpoint directory")
            continue
        try:
            size = fpath.stat().st_size
        except FileNotFoundError:
            problems.append(f"{fname}: missing")
            continue
        if size != entry.size:
            problems.append(f"{fname}: size {size} bytes, manifest says {entry.size} (truncated or modified)")
            continue
        try:
            digest = hash_file(fpath)
        except OSError as exc:
            problems.append(f"{fname}: cannot be read ({exc.strerror or exc})")
            continue
        if digest != entry.hash:
            problems.append(f"{fname}: content hash does not match the manifest (modified or corrupted)")
    if problems:
        raise IntegrityError(
            f"checkpoint {path} failed verification; nothing was loaded:\n  " + "\n  ".join(problems)
        )
    return manifest


def tensor_files(manifest: Manifest) -> Iterator[str]:
    return (f for f in sorted(manifest.files) if f.endswith(".safetensors"))


def load_checkpoint(path: Path, *, check: bool = True) -> tuple[Manifest, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify (unless ``check=False``) and load a checkpoint: manifest, tensors, state.

    Nothing is returned unless every file matches the manifest.
    """
    path = Path(path)
    manifest = verify(path) if check else read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    for fname in tensor_files(manifest):
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise IntegrityError(f"{path}: manifest entry {fname!r} escapes the checkpoint directory")
        try:
            tensors.update(load_file(str(path / fname)))
        except (SafetensorError, OSError) as exc:
            raise IntegrityError(f"{path / fname}: cannot read safetensors file ({exc})") from exc
    return manifest, tensors, read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's ``state.json`` (everything that is not a tensor)."""
    try:
        state = json.loads((Path(path) / STATE).read_bytes())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{Path(path) / STATE}: cannot read ({exc})") from exc
    if not isinstance(state, dict):
        raise IntegrityError(f"{Path(path) / STATE}: not a JSON object")
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
    dtype, shape and byte range, which must lie inside the file, in order, without overlap."""
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        base = 8 + n
        out: list[TensorInfo] = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(meta["dtype"])
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
            if any(d < 0 for d in shape) or not 0 <= begin <= end or base + end > size:
                raise ValueError(f"tensor {name!r}: shape {shape} or byte range {begin}-{end} is invalid")
            if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: {end - begin} bytes do not hold {shape} of {meta['dtype']}")
            out.append(TensorInfo(str(name), fname, dtype, shape, base + begin, base + end))
        ranges = sorted((i.start, i.end) for i in out)
        if any(b < a_end for (_, a_end), (b, _) in zip(ranges, ranges[1:])):
            raise ValueError("tensor byte ranges overlap")
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{fname}: not a valid safetensors file ({exc})") from exc


def open_tensor_files(path: Path, manifest: Manifest, stack: ExitStack) -> dict[str, BinaryIO]:
    """Open every tensor file of a checkpoint (before verifying it: what is then read is what
    was verified, even if the version is deleted or renamed in between)."""
    files: dict[str, BinaryIO] = {}
    for fname in tensor_files(manifest):
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise IntegrityError(f"{path}: manifest entry {fname!r} escapes the checkpoint directory")
        files[fname] = stack.enter_context(open(Path(path) / fname, "rb", buffering=0))
    return files


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


def load_into(path: Path, files: Mapping[str, BinaryIO], index: Mapping[str, TensorInfo],
              targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load every tensor of a verified checkpoint: straight into the matching tensor of
    ``targets`` (CPU, contiguous, same dtype and shape) when there is one, else into a new
    tensor; one copy out of the page cache, no intermediate buffer.  A file holding a dtype
    this reader does not map is loaded through safetensors instead.

    A read that fails part way raises :class:`IntegrityError`; targets filled before it keep
    their new values (restore again)."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in index.values():
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, torch.Tensor] = {}
    try:
        for fname, infos in sorted(by_file.items()):
            if any(i.dtype is None for i in infos):
                out.update(load_file(str(Path(path) / fname)))
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
    except (OSError, SafetensorError) as exc:
        raise IntegrityError(
            f"{path}: reading the checkpoint failed part way ({exc}); tensors read before the failure "
            "were already loaded: restore again before training on"
        ) from exc
    return out


def iter_files(ckpt: LocalCheckpoint) -> Iterable[tuple[str, int]]:
    """(file name, size) of every file including the manifest, manifest last."""
    for fname, entry in sorted(ckpt.manifest.files.items()):
        yield fname, entry.size
    yield MANIFEST, (ckpt.path / MANIFEST).stat().st_size
