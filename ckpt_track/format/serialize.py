"""Writing safetensors files in one pass over the bytes, hashed on the way.

The safetensors layout is simple: an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range; ``__metadata__``) padded with spaces to a multiple of 8
bytes, then the tensors' bytes back to back.  Writing it here, straight from the staging
buffers, lets one pass over each tensor's bytes feed both digests a checkpoint needs (the
group's content digest, which names a content-addressed file, and the file's own xxh3-128,
which the manifest records) while the bytes are in the CPU cache, instead of a digest pass,
a serialization that copies every tensor into a new buffer, and a second pass that reads the
file back to hash it.  Tensors are laid out in name order (safetensors itself orders by dtype
first, so a file holding one dtype is byte-identical to what ``safetensors.torch.save_file``
writes); any safetensors reader loads either.

The bytes then go to the file in large writes; on Linux, writeback of each 64 MiB written is
started at once (``sync_file_range``), so the final ``fsync`` does not meet a whole file of
dirty pages in one burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from .hashing import tensor_bytes
from .manifest import FileEntry

__all__ = ["Prepared", "prepare", "write_prepared"]

_ST_NAMES: dict[torch.dtype, str] = {
    dtype: name for name, dtype in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
    }.items() if dtype is not None
}
_SLICE = 1 << 20  # bytes hashed at a time: both digests read the slice while it is in the CPU cache
WRITEBACK_EVERY = 64 << 20  # start writeback of each this many bytes written


@dataclass
class Prepared:
    """A safetensors file ready to write: its header, its tensors' bytes in file order, the
    file's xxh3-128 and size, and the content digest of the group (see ``content_digest``)."""

    header: bytes
    parts: list[memoryview]
    file_hash: str
    size: int
    content: str


def header_bytes(tensors: Mapping[str, torch.Tensor], order: Sequence[str],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``order`` in that order."""
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        dtype = _ST_NAMES.get(t.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def prepare(tensors: Mapping[str, torch.Tensor], names: Sequence[str], *,
            metadata: Mapping[str, str] | None = None) -> Prepared:
    """Lay out the named tensors (contiguous CPU tensors that share no memory) as one
    safetensors file and compute, in one pass over their bytes, the file's hash and the
    group's content digest (equal to :func:`ckpt_track.format.hashing.content_digest`)."""
    order = sorted(names)
    _check_owned(tensors, order)
    header = header_bytes(tensors, order, metadata)
    file_h = xxhash.xxh3_128()
    content_h = xxhash.xxh3_128()
    file_h.update(header)
    parts: list[memoryview] = []
    for name in order:
        t = tensors[name]
        content_h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        data = tensor_bytes(t)
        for off in range(0, len(data), _SLICE):
            piece = data[off:off + _SLICE]
            content_h.update(piece)
            file_h.update(piece)
        parts.append(data)
    size = len(header) + sum(len(p) for p in parts)
    return Prepared(header, parts, file_h.hexdigest(), size, content_h.hexdigest())


def _check_owned(tensors: Mapping[str, torch.Tensor], order: Sequence[str]) -> None:
    """Refuse what safetensors refuses: a tensor not on the CPU or not contiguous, and tensors
    whose memory overlaps (each must be stored on its own; snapshots guarantee both)."""
    spans = []
    for name in order:
        t = tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor (copy it first)")
        if t.numel():
            start = t.data_ptr()
            spans.append((start, start + t.numel() * t.element_size(), name))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"tensors {first!r} and {second!r} share memory; store each from its own copy")


def write_prepared(path: Path, prepared: Prepared, *, sync: bool = True) -> FileEntry:
    """Write a prepared file (never over an existing one), fsynced unless ``sync=False``, and
    describe it for the manifest."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)  # as the umask gives
    try:
        written = _write_all(fd, memoryview(prepared.header), 0)
        for part in prepared.parts:
            written = _write_all(fd, part, written)
        if written != prepared.size:
            raise OSError(f"{path}: wrote {written} bytes, expected {prepared.size}")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(prepared.size, prepared.file_hash)


def _write_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at the file's current position (``offset`` bytes in); start the
    writeback of each ``WRITEBACK_EVERY`` bytes; return the new offset."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    started = offset - offset % WRITEBACK_EVERY
    while done < len(view):
        n = os.write(fd, view[done:done + WRITEBACK_EVERY])  # large writes, each then sent on to the disk
        if n <= 0:
            raise OSError(f"write returned {n}")
        done += n
        end = offset + done
        if end - started >= WRITEBACK_EVERY:
            _start_writeback(fd, started, end - started)
            started = end
    return offset + done


_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing: fsync does it all)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure changes nothing
