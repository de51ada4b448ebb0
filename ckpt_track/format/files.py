"""Opening and parsing checkpoint files that may be damaged or hostile.

A checkpoint may come from anywhere (a download, a shared disk), so every file is
opened without following links, without blocking on a FIFO, and only when it is a
regular file; every read has an exact length; JSON is parsed with duplicate keys
and excessive nesting refused.  Nothing here ever unpickles.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import IntegrityError

CHUNK = 8 * 1024 * 1024  # bytes read at a time when streaming a file
MAX_JSON_DEPTH = 200  # nesting of a manifest, state.json or header; ckpt_track writes far less
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


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


_ADVICE = {"sequential": getattr(os, "POSIX_FADV_SEQUENTIAL", None), "willneed": getattr(os, "POSIX_FADV_WILLNEED", None)}


def advise(f: BinaryIO, *advice: str, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel how an open file is about to be read (``length`` 0: to its end):
    ``"sequential"`` widens its readahead, ``"willneed"`` starts reading the range into the page
    cache at once (on a cold file the disk then gets the whole range queued instead of one
    readahead window at a time; on a cached one it costs about 0.2 ms per GiB).  Only a hint:
    where the platform or the file system takes none, nothing happens."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return
    try:
        fd = f.fileno()
        for name in advice:
            if (flag := _ADVICE[name]) is not None:
                fadvise(fd, offset, length, flag)
    except (OSError, ValueError, AttributeError):
        pass


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


def chunks(f: BinaryIO, size: int, short: Callable[[int], Exception]) -> Iterator[memoryview]:
    """The next ``size`` bytes of ``f`` in chunks of at most ``CHUNK`` bytes (one reused buffer:
    use each chunk before asking for the next); ``short(bytes_left)`` is raised if the file
    ends first."""
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    left = size
    while left:
        n = f.readinto(view[:min(left, len(buf))])
        if not n:
            raise short(left)
        yield view[:n]
        left -= n


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
