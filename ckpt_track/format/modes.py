"""File modes of committed checkpoints: readable as the umask allows, never writable.

A committed checkpoint is immutable: its files are never changed in place, so a store may
hard-link one file into several versions, runs and cache entries.  To keep that true when
some other tool touches a file, every file of a checkpoint loses its write bits once the
checkpoint is committed (:func:`seal`), and keeps the read bits the process's umask gives
(``0o444 & ~umask``: ``0444`` under umask ``0022``, ``0440`` under ``0027``), so that
whoever may read the store's directories may restore from it.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

__all__ = ["current_umask", "read_only_mode", "seal", "seal_file"]

_WRITE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_READ = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows
    (``/proc/self/status`` on Linux 4.7+): setting it to read it would, for a moment,
    give files other threads create the wrong mode."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def read_only_mode(umask: int | None = None) -> int:
    """The mode of a committed checkpoint file: the umask's read bits, no write bits."""
    return _READ & ~(current_umask() if umask is None else umask)


def seal_file(path: Path, mode: int | None = None) -> None:
    """Make one regular file read-only (``mode``, default :func:`read_only_mode`).

    A file that already has no write bits is left alone: it is sealed already, possibly a
    hard link shared with other checkpoints, whose readers keep the access they had.  A file
    another link still shares (written before files were sealed) only loses its write bits.
    Links and other non-regular files are never followed nor changed."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & _WRITE:
        return
    want = (st.st_mode & _READ) if st.st_nlink > 1 else (read_only_mode() if mode is None else mode)
    if st.st_nlink > 1 and st.st_uid != os.geteuid():
        return  # a link to a colleague's file (an older, writable store): not ours to chmod, and never written
    os.chmod(path, want)  # our own staging directory: nothing swaps the name for a link meanwhile


def seal(directory: Path) -> None:
    """Seal every file of a checkpoint directory (flat: the format holds no subdirectories)."""
    mode = read_only_mode()
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                seal_file(Path(entry.path), mode)
