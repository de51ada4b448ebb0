"""Writing safetensors files in one pass over the bytes, hashed on the way.

The safetensors layout is simple: an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range; ``__metadata__``) padded with spaces to a multiple of 8
bytes, then the tensors' bytes back to back.  Writing it here, straight from the staging
buffers, needs one pass over the bytes for the file's xxh3-128 (which the manifest records and
which also names a content-addressed file: ``t-<xxh3 of the file>.safetensors``), instead of a
digest pass, a serialization that copies every tensor into a new buffer, and a second pass that
reads the file back to hash it.  Tensors are laid out in name order (safetensors itself orders
by dtype first, so a small file holding one dtype is byte-identical to what
``safetensors.torch.save_file`` writes); any safetensors reader loads either.

Naming a file by the hash of its own bytes keeps "equal names mean equal bytes" true across
writers: files written before this writer are named by a digest of their tensors' names,
dtypes, shapes and bytes (``hashing.content_digest``), and this writer lays some of the same
tensors out differently (padding, order), so it must never reuse such a name for other bytes
(a tracker that holds a file once per run would keep the old bytes under the new manifest's hash).

The bytes then go to the disk without the page cache (``O_DIRECT``), straight from the
staging buffers where they are aligned (a file of 1 MiB or more gets its header padded with
spaces so that its data starts on a 4 KiB boundary, and staging buffers are 4 KiB aligned:
:func:`aligned_empty`), else through a small aligned bounce buffer.  Copying into the page
cache costs this machine 1-2.5 CPU-seconds per GiB, more than all the rest of a save; a direct
write costs under 0.1, and leaves no burst of dirty pages for the final ``fsync`` (or for the
training loop's memory bandwidth).  Where direct I/O is refused (a file system without it) the
file is written through the page cache in large writes, and on Linux the writeback of each
64 MiB is started at once (``sync_file_range``) so the ``fsync`` does not meet it all at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import json
import math
import mmap
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from .hashing import tensor_bytes
from .manifest import FileEntry
from .read import _ST_DTYPES

__all__ = ["Prepared", "aligned_empty", "prepare", "write_prepared"]

_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}  # what the reader maps
WRITEBACK_EVERY = 64 << 20  # buffered writes: start writeback of each this many bytes written
ALIGN = 4096  # direct I/O: file offsets, lengths and memory addresses are multiples of this
ALIGN_FILES_FROM = 1 << 20  # files this large get their data aligned (header padding <= 4 KiB)
_BOUNCE = 8 << 20  # the aligned buffer unaligned bytes go through on their way to a direct write
DIRECT = hasattr(os, "O_DIRECT")  # tests turn it off to exercise the buffered path


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for staging, whose data starts on an ``ALIGN``
    boundary when it is large enough for a file of its own (what a direct write can read from
    without a bounce copy).  It owns exactly its bytes (storage offset 0, storage size = its
    size), as DCP's writers and safetensors expect of a tensor they write without cloning.

    Pinned memory (a CUDA source) comes page-aligned from the CUDA host allocator already; a
    large CPU buffer is an anonymous memory map (page-aligned, transparent huge pages asked
    for where the kernel offers them on request)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if pin_memory or size < ALIGN_FILES_FROM:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=pin_memory)
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # advisory
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(tuple(shape))


@dataclass
class Prepared:
    """A safetensors file ready to write: its header, its tensors' bytes in file order, and the
    file's xxh3-128 and size."""

    header: bytes
    parts: list[memoryview]
    file_hash: str
    size: int


def header_bytes(tensors: Mapping[str, torch.Tensor], order: Sequence[str],
                 metadata: Mapping[str, str] | None = None, align: int = 8) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``order`` in that order,
    padded with spaces (JSON whitespace) so that the data starts at a multiple of ``align``."""
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
    raw += b" " * (-(8 + len(raw)) % align)  # safetensors itself aligns to 8
    return len(raw).to_bytes(8, "little") + raw


def prepare(tensors: Mapping[str, torch.Tensor], names: Sequence[str], *,
            metadata: Mapping[str, str] | None = None) -> Prepared:
    """Lay out the named tensors (contiguous CPU tensors that share no memory) as one
    safetensors file and compute the file's hash in one pass over their bytes."""
    order = sorted(names)
    _check_owned(tensors, order)
    data_size = sum(tensors[n].numel() * tensors[n].element_size() for n in order)
    header = header_bytes(tensors, order, metadata, ALIGN if data_size >= ALIGN_FILES_FROM else 8)
    file_h = xxhash.xxh3_128()
    file_h.update(header)
    parts = [tensor_bytes(tensors[name]) for name in order]
    for data in parts:
        file_h.update(data)
    size = len(header) + sum(len(p) for p in parts)
    return Prepared(header, parts, file_h.hexdigest(), size)


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
    describe it for the manifest.  Direct I/O where the file system takes it, else buffered."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct = DIRECT and prepared.size >= ALIGN_FILES_FROM
    fd = -1
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o666)  # as the umask gives
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct = False  # this file system has no direct I/O
    if fd < 0:
        fd = os.open(path, flags, 0o666)
    try:
        pieces = [memoryview(prepared.header), *prepared.parts]
        written = _DirectWriter(fd).write(pieces) if direct else _write_buffered(fd, pieces)
        if written != prepared.size:
            raise OSError(errno.EIO, f"{path}: wrote {written} bytes, expected {prepared.size}")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(prepared.size, prepared.file_hash)


def _bytes(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _write_buffered(fd: int, pieces: Sequence[memoryview]) -> int:
    written = 0
    for piece in pieces:
        written = _write_all(fd, _bytes(piece), written)
    return written


class _DirectWriter:
    """Writes a file's pieces with ``O_DIRECT``: each aligned stretch of a piece straight from
    its memory, everything else through an aligned bounce buffer; the last partial block with
    direct I/O switched off (a direct write's length must be a multiple of ``ALIGN``).  A file
    system that refuses a direct write part way (EINVAL) gets the rest buffered."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0  # bytes on disk
        self.direct = True
        self._view = _bounce_buffer()
        self._fill = 0
        self.bounced = 0  # bytes that went through the bounce buffer (the rest went straight)

    def write(self, pieces: Sequence[memoryview]) -> int:
        try:
            for piece in pieces:
                self._piece(_bytes(piece))
            self._flush_bounce(final=True)
        finally:
            self._view = memoryview(b"")
        return self.offset

    def _piece(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            rest = data[pos:]
            if self.direct and self._fill % ALIGN == 0 and len(rest) >= ALIGN and _address(rest) % ALIGN == 0:
                if self._fill:
                    self._flush_bounce()  # whole blocks (a padded header): the file offset stays aligned
                n = len(rest) - len(rest) % ALIGN
                self._write(rest[:n])  # straight from the staging buffer
                pos += n
                continue
            n = min(len(rest), _BOUNCE - self._fill)
            self._view[self._fill:self._fill + n] = rest[:n]
            self._fill += n
            self.bounced += n
            pos += n
            if self._fill == _BOUNCE:
                self._flush_bounce()

    def _flush_bounce(self, final: bool = False) -> None:
        whole = self._fill - self._fill % ALIGN
        if whole:
            self._write(self._view[:whole])
        tail = self._fill - whole
        if tail and final:
            self._buffered()
            self._write(self._view[whole:self._fill])
            tail = 0
        if tail:
            self._view[:tail] = self._view[whole:self._fill]
        self._fill = tail

    def _write(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                n = os.write(self.fd, data[done:done + (256 << 20)])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # direct I/O refused after all: the rest goes through the page cache
                continue
            if n <= 0:
                raise OSError(errno.EIO, f"write returned {n}")
            done += n
            self.offset += n

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False


_local = threading.local()


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned bounce buffer, kept for its next file (a fresh one would
    fault its pages in again for every file)."""
    view = getattr(_local, "bounce", None)
    if view is None:
        view = _local.bounce = memoryview(mmap.mmap(-1, _BOUNCE))
    return view


def _address(view: memoryview) -> int:
    """The memory address a byte view starts at (no copy)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _write_all(fd: int, view: memoryview, offset: int) -> int:
    """Write all of ``view`` at the file's current position (``offset`` bytes in) through the
    page cache, in ``WRITEBACK_EVERY`` pieces whose writeback is started at once; return the
    new offset."""
    done = 0
    started = offset - offset % WRITEBACK_EVERY
    while done < len(view):
        n = os.write(fd, view[done:done + WRITEBACK_EVERY])
        if n <= 0:
            raise OSError(errno.EIO, f"write returned {n}")
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
