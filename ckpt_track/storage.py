"""The storage seam: every place a store reads or writes checkpoint files goes through one
small interface, so another kind of storage (object stores through fsspec) can be added
without touching the backends.  Today there is one implementation, the local file system.

Paths are ``pathlib.Path`` here; an object-store implementation would take its URLs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout

from .errors import BackendUnavailable
from .format import LocalCheckpoint, atomic_json, copy_checkpoint, read_json_file, read_manifest, remove_dir

__all__ = ["LOCAL", "LocalStorage", "Storage"]

LOCK_TIMEOUT_S = 120.0


class Storage(Protocol):
    """Where a store keeps its files.  Writes are atomic: a reader sees a file or directory
    whole or not at all."""

    def read_json(self, path: Path) -> dict[str, Any]:
        """A small JSON table; ``{}`` when absent, ``IntegrityError`` when damaged."""

    def write_json(self, path: Path, data: Any, *, fix: str = ...) -> None:
        """Replace a small JSON table atomically."""

    def copy_in(self, ckpt: LocalCheckpoint, parent: Path, name: str,
                sources: Mapping[str, Path] | None = None) -> LocalCheckpoint:
        """Copy a committed checkpoint to ``parent/name``, manifest last, published atomically;
        ``sources`` names files the store already holds with the same contents (linked)."""

    def open_checkpoint(self, path: Path) -> LocalCheckpoint:
        """The committed checkpoint at ``path`` (``CheckpointNotFound`` when not committed)."""

    def rename(self, src: Path, dst: Path) -> None:
        """Move a directory into place (atomic where the storage allows it)."""

    def remove(self, path: Path) -> None:
        """Remove a directory so that a half-removed one is never taken for a checkpoint."""

    def trash(self, path: Path) -> Path | None:
        """Rename a directory out of the way at once (it is no longer a checkpoint), to be
        removed later with :meth:`remove_now`; None when it does not exist."""

    def remove_now(self, path: Path) -> None:
        """Remove what no reader can mistake for a checkpoint (temporary copies, trash)."""

    def lock(self, directory: Path) -> Any:
        """A context manager holding the exclusive lock of ``directory``."""


class LocalStorage:
    """The local file system (also a network mount): hard links where possible, rename as the
    commit, ``filelock`` for the per-directory lock."""

    def read_json(self, path: Path) -> dict[str, Any]:
        return read_json_file(path)

    def write_json(self, path: Path, data: Any, *, fix: str = "free disk space") -> None:
        atomic_json(path, data, fix=fix)

    def copy_in(self, ckpt: LocalCheckpoint, parent: Path, name: str,
                sources: Mapping[str, Path] | None = None) -> LocalCheckpoint:
        return copy_checkpoint(ckpt, parent, name, sources=dict(sources or {}))

    def open_checkpoint(self, path: Path) -> LocalCheckpoint:
        return LocalCheckpoint(path, read_manifest(path))

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def remove(self, path: Path) -> None:
        remove_dir(path)

    def trash(self, path: Path) -> Path | None:
        if not path.exists():
            return None
        target = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, target)
        return target

    def remove_now(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def lock(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(directory / ".lock"), timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout as exc:
            raise BackendUnavailable(
                f"could not lock {directory} within {LOCK_TIMEOUT_S:.0f} s; another process holds "
                f"{directory / '.lock'} (delete it only if no ckpt_track process is running)"
            ) from exc


LOCAL = LocalStorage()
