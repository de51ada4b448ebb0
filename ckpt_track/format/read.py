"""Verifying and loading checkpoints.

Every file is opened once (regular files only), verified against the manifest
from the open file, and then read from that same open file: what is loaded is
what was verified, even if the directory changes in between.  Safetensors headers
are parsed as JSON and checked before any tensor is read; tensors are read
straight into their destination memory.  Nothing is ever unpickled.

Hashing and reading run in a small thread pool (:func:`_run_all`): files are hashed one per
task, xxh3 being a stream that cannot be split, and tensors are read in pieces of at most
``_PIECE`` bytes with ``preadv`` (no shared file offset), so both use several cores.  Both
release the GIL: measured on 2 cores with xxhash 3.x, two threads hash two 256 MiB buffers
1.7x faster than one while a pure-Python thread alongside keeps its full speed, and two
threads ``preadv`` 1 GiB out of the page cache 1.6x faster than one.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from ..errors import IntegrityError
from .files import CHUNK, advise, check_name, load_json, open_regular, read_exact
from .hashing import hash_open, tensor_bytes
from .manifest import HASH_ALGORITHM, MAX_STATE_BYTES, STATE, FileEntry, Manifest, read_manifest

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself applies to a header
_MAX_DIM = 2**48
_T = TypeVar("_T")
_R = TypeVar("_R")
_MAX_WORKERS = 8  # hashing and copying out of the page cache are memory-bound: more threads gain nothing
_PARALLEL_MIN_BYTES = 4 * CHUNK  # below this a thread pool costs more than it saves
_PIECE = 4 * CHUNK  # the most bytes one read task moves (a large tensor is read by several threads)
_WILLNEED_MAX = 64 * CHUNK  # the most of one file asked into the page cache before hashing or reading it
_PREADV = getattr(os, "preadv", None)  # POSIX; not on Windows


def _workers(tasks: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_WORKERS, tasks))


def _run_all(fn: Callable[[_T], _R], items: Sequence[_T], nbytes: int) -> list[_R]:
    """``fn`` over every item (results in item order), in a small thread pool when there are
    several items and ``nbytes`` is worth it.  Every item is run to the end even when one raises;
    the first exception, in item order, is then raised."""
    workers = _workers(len(items)) if nbytes >= _PARALLEL_MIN_BYTES else 1
    if workers == 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt_track-read") as pool:
        futures = [pool.submit(fn, i) for i in items]
    return [f.result() for f in futures]


# -- verifying -------------------------------------------------------------------------
def verify(path: Path, manifest: Manifest | None = None, *,
           opened: Mapping[str, BinaryIO] | None = None) -> Manifest:
    """Re-hash every file against the manifest; raise :class:`IntegrityError` naming
    each missing, truncated, modified, linked or special file.  ``opened`` holds files
    already open (see :func:`open_files`): those are hashed, not reopened by name."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    if manifest.hash_algorithm != HASH_ALGORITHM:
        raise IntegrityError(f"{path}: unknown hash algorithm {manifest.hash_algorithm!r}")
    opened = opened or {}
    # largest first, so that the pool is not left waiting on one big file at the end
    names = sorted(manifest.files, key=lambda f: (-manifest.files[f].size, f))
    found = _run_all(lambda f: _file_problem(path, f, manifest.files[f], opened.get(f)), names,
                     sum(e.size for e in manifest.files.values()))
    problems = [p for _, p in sorted(zip(names, found, strict=True)) if p]  # in name order, as ever
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
            advise(f, "sequential", "willneed", length=min(size, _WILLNEED_MAX))
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
    """Open every file the manifest lists (regular files only, never through a link), each
    advised to the kernel as read sequentially (a wider readahead on a cold file)."""
    files = {fname: stack.enter_context(open_regular(Path(path) / check_name(fname, path)))
             for fname in sorted(manifest.files)}
    for f in files.values():
        advise(f, "sequential")
    return files


def open_tensor_files(path: Path, manifest: Manifest, stack: ExitStack) -> dict[str, BinaryIO]:
    """Open every tensor file of a checkpoint (before verifying it: what is then read is what
    was verified, even if the version is deleted or renamed in between)."""
    return {fname: stack.enter_context(open_regular(Path(path) / check_name(fname, path)))
            for fname in tensor_files(manifest)}


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


# -- loading ---------------------------------------------------------------------------
def load_checkpoint(path: Path, *, check: bool = True) -> tuple[Manifest, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify (unless ``check=False``) and load a checkpoint: manifest, tensors, state.

    Nothing is returned unless every file matches the manifest.
    """
    path = Path(path)
    with ExitStack() as stack:
        manifest = read_manifest(path)
        refuse_sharded(path, manifest)
        if check and manifest.hash_algorithm != HASH_ALGORITHM:
            raise IntegrityError(f"{path}: unknown hash algorithm {manifest.hash_algorithm!r}")
        files = open_verified(path, manifest, stack, check=check)
        tensor_fds = {f: files[f] for f in tensor_files(manifest)}
        tensors = load_into(path, tensor_fds, tensor_index(tensor_fds, path), {})
        if STATE not in files:
            raise IntegrityError(f"{path}: the manifest lists no {STATE}; the checkpoint is damaged")
        state = read_state_open(files[STATE], Path(path) / STATE)
    return manifest, tensors, state


def refuse_sharded(path: Path, manifest: Manifest) -> None:
    """Raise a clear error for a sharded (format v2) checkpoint where whole tensors are
    expected: its files hold shards, and loading one as a full tensor would be wrong."""
    if manifest.sharded:
        raise IntegrityError(
            f"{path} is a sharded checkpoint (format v{manifest.format_version}, written by "
            f"{manifest.world_size} ranks): its tensor files hold shards, not whole tensors. Restore it "
            "with ct.restore(ref, model=...) or run.resume(...), which reassemble or reshard it"
        )


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


# -- safetensors headers ---------------------------------------------------------------
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
            raise TypeError("the header is not a JSON object")
        base = 8 + n
        out = [_tensor_info(fname, name, meta, base, size) for name, meta in header.items() if name != "__metadata__"]
        if not isinstance(header.get("__metadata__", {}), dict):
            raise TypeError("__metadata__ is not a JSON object")
        ranges = sorted((i.start, i.end) for i in out)
        if any(b < a_end for (_, a_end), (b, _) in itertools.pairwise(ranges)):
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
        raise TypeError(f"tensor {name!r}: entry is not a JSON object")
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


def tensor_index(files: Mapping[str, BinaryIO], where: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint: name -> where it lies."""
    index: dict[str, TensorInfo] = {}
    for fname, f in sorted(files.items()):
        for info in read_header(f, fname):
            if info.name in index:
                raise IntegrityError(f"{where}: tensor {info.name!r} is stored twice ({index[info.name].file}, {fname})")
            index[info.name] = info
    return index


# -- reading tensors into memory ---------------------------------------------------------
def fits(t: torch.Tensor | None, info: TensorInfo) -> bool:
    """True when ``t`` can receive the tensor ``info`` describes in place (CPU, contiguous,
    same dtype and shape)."""
    return (t is not None and t.device.type == "cpu" and t.is_contiguous() and t.dtype == info.dtype
            and tuple(t.shape) == info.shape)


_PART_WAY = "tensors read before the failure were already loaded: restore again before training on"


def load_into(path: Path, files: Mapping[str, BinaryIO], index: Mapping[str, TensorInfo],
              targets: Mapping[str, torch.Tensor], *, part_way: str = _PART_WAY) -> dict[str, torch.Tensor]:
    """Load every tensor of a verified checkpoint: straight into the matching tensor of
    ``targets`` (CPU, contiguous, same dtype and shape) when there is one, else into a new
    tensor; one copy out of the page cache, no intermediate buffer, by several threads for a
    large read (``preadv`` of at most ``_PIECE`` bytes each).  A file holding a dtype this
    reader does not map is loaded through safetensors instead.

    Only the tensors of ``index`` are read (all of a file holding an unmapped dtype).  A read
    that fails part way raises :class:`IntegrityError` (``part_way`` says what it left);
    targets filled before it keep their new values (restore again)."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in index.values():
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, torch.Tensor] = {}
    pieces: list[_Piece] = []
    try:
        for fname, infos in sorted(by_file.items()):
            if any(i.dtype is None for i in infos):
                out.update(_load_whole(files[fname], fname, {i.name for i in infos}))
                continue
            infos.sort(key=lambda i: i.start)
            advise(files[fname], "willneed", offset=infos[0].start,
                   length=min(infos[-1].end - infos[0].start, _WILLNEED_MAX))
            for info in infos:
                out[info.name] = t = _destination(info, targets.get(info.name))
                pieces.extend(_pieces(files[fname], fname, info, t))
        # without preadv (or a file descriptor) reads share the file offset: one thread then
        threaded = _PREADV is not None and all(p.fd is not None for p in pieces)
        _run_all(_read_pieces, _tasks(pieces), sum(len(p.view) for p in pieces) if threaded else 0)
    except (OSError, SafetensorError, IntegrityError, KeyError, ValueError) as exc:
        raise IntegrityError(f"{path}: reading the checkpoint failed part way ({exc}); {part_way}") from exc
    return out


def read_tensor(f: BinaryIO, fname: str, info: TensorInfo) -> torch.Tensor:
    """One tensor of an open, verified file into new memory (a mapped dtype only)."""
    return _read_tensor(f, fname, info, None)


def _read_tensor(f: BinaryIO, fname: str, info: TensorInfo, target: torch.Tensor | None) -> torch.Tensor:
    """Read one tensor's bytes from the open file into ``target`` when it :func:`fits`, else
    into a new tensor; :class:`OSError` if the file ends inside it."""
    t = _destination(info, target)
    _read_pieces(_pieces(f, fname, info, t))
    return t


def _destination(info: TensorInfo, target: torch.Tensor | None) -> torch.Tensor:
    """Where a tensor is read: ``target`` when it :func:`fits`, else new memory."""
    return target if target is not None and fits(target, info) else torch.empty(info.shape, dtype=info.dtype)


@dataclass(frozen=True)
class _Piece:
    """Up to ``_PIECE`` bytes of one tensor: read from ``offset`` of the file straight into ``view``
    (the destination tensor's own memory)."""

    f: BinaryIO
    fd: int | None  # None: a file object without a descriptor (read through seek and readinto)
    fname: str
    name: str
    view: memoryview
    offset: int


def _fd(f: BinaryIO) -> int | None:
    try:
        return f.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _pieces(f: BinaryIO, fname: str, info: TensorInfo, t: torch.Tensor) -> list[_Piece]:
    view, fd = tensor_bytes(t), _fd(f)
    return [_Piece(f, fd, fname, info.name, view[off:off + _PIECE], info.start + off)
            for off in range(0, len(view), _PIECE)]


def _tasks(pieces: Sequence[_Piece]) -> list[list[_Piece]]:
    """Pieces grouped, in file order, into tasks of about ``_PIECE`` bytes (many small tensors
    make one task, a large one several)."""
    tasks: list[list[_Piece]] = []
    size = _PIECE
    for p in pieces:
        if size >= _PIECE:
            tasks.append([])
            size = 0
        tasks[-1].append(p)
        size += len(p.view)
    return tasks


def _read_pieces(pieces: Sequence[_Piece]) -> None:
    """Fill each piece's view from its file: ``preadv`` at the piece's offset (no shared file
    position, so pieces of one file may be read by several threads), else seek and readinto;
    :class:`OSError` if the file ends inside the tensor."""
    for p in pieces:
        got, want = 0, len(p.view)
        while got < want:
            if p.fd is not None and _PREADV is not None:
                n = _PREADV(p.fd, [p.view[got:]], p.offset + got)
            else:
                p.f.seek(p.offset + got)
                n = p.f.readinto(p.view[got:])
            if not n:
                raise OSError(f"{p.fname} ended inside tensor {p.name!r} (truncated)")
            got += n


def _load_whole(f: BinaryIO, fname: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a file holding a dtype :func:`load_into` does not map, through
    safetensors from the bytes of the open (verified) file: never reopened by name."""
    data = read_exact(f, os.fstat(f.fileno()).st_size, fname)
    return {k: v for k, v in load_safetensors_bytes(data).items() if k in names}
