"""File and content hashing (xxh3-128), and the naming of content-addressed tensor files.

A file's hash is what the manifest records and what verification recomputes, and it names a
content-addressed tensor file (``t-<xxh3 of the file>.safetensors``, see
:mod:`ckpt_track.format.serialize`; files of earlier versions, and of dtypes that writer does
not name, carry a tensor group's *content* digest instead): equal names mean equal bytes,
which is what lets an incremental checkpoint link an unchanged file from an earlier one and a
backend store it once per run.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from .files import CHUNK, chunks, open_regular

PACK_SIZE = 1024 * 1024  # tensors below this are packed together into files up to this size
_BLOB_RE = re.compile(r"^t-[0-9a-f]{32}\.safetensors$")


def _hasher() -> Any:
    return xxhash.xxh3_128()


def hash_file(path: Path) -> str:
    """xxh3-128 of a regular file (never through a link; see :func:`open_regular`)."""
    with open_regular(Path(path)) as f:
        return hash_open(f, os.fstat(f.fileno()).st_size)


MAP_WINDOW = 2 * CHUNK  # bytes of a file mapped at a time while hashing it


def hash_open(f: BinaryIO, size: int) -> str:
    """xxh3-128 of the first ``size`` bytes of an open file (at most ``size`` are read; a file
    that ends before raises :class:`OSError`).  Large files go through read-only memory maps of
    ``MAP_WINDOW`` bytes at a time (no copy out of the page cache, about twice as fast as reading
    when cached; a window at a time, so a process hashing large files holds no more than that
    of them mapped), small ones in 8 MiB chunks."""
    h = _hasher()
    if size >= CHUNK:
        try:
            for off in range(0, size, MAP_WINDOW):
                length = min(MAP_WINDOW, size - off)
                with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=off) as m:
                    if hasattr(m, "madvise"):
                        m.madvise(mmap.MADV_SEQUENTIAL)
                    view = memoryview(m)
                    try:
                        h.update(view)
                    finally:
                        view.release()
            return h.hexdigest()
        except (OSError, ValueError):  # cannot map this file (or it is shorter): read it instead
            h = _hasher()
    f.seek(0)
    for chunk in chunks(f, size, lambda left: OSError(errno.EIO, f"file ended {left} bytes before its "
                                                                 f"recorded size {size}")):
        h.update(chunk)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
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
        h.update(tensor_bytes(t))
    return h.hexdigest()


def blob_name(digest: str) -> str:
    """The file name of a content-addressed tensor file (what :func:`is_blob` recognizes)."""
    return f"t-{digest}.safetensors"


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
