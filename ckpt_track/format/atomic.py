"""Atomic file-system steps shared by the checkpoint writer and every store.

Whatever is written is first assembled in a hidden temporary sibling (``TMP_PREFIX``),
fsynced, then renamed into place: a reader, or a process started after a crash, sees
the old state or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import CheckpointWriteError, IntegrityError
from .manifest import MANIFEST

TMP_PREFIX = ".tmp-"


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds (what manifests and stores record)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def free_space(path: Path) -> str:
    """``"123.4 MiB free"`` on the disk holding ``path`` (for error messages)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


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


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written, fsynced directory into place (atomic on POSIX)."""
    fsync_dir(tmp)
    os.rename(tmp, final)  # fails if final exists and is non-empty: no clobbering
    fsync_dir(final.parent)


def atomic_json(path: Path, data: Any, *, fix: str = "free disk space") -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary sibling, fsync, rename): a
    reader sees the old file or the new one, never a part.  ``CheckpointWriteError`` names the
    file, the free space and ``fix``."""
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


@contextmanager
def staging(parent: Path, name: str) -> Iterator[tuple[Path, Path]]:
    """``(tmp, final)`` for a new checkpoint directory ``parent/name``: ``FileExistsError``
    if it already exists (never clobbers); ``tmp`` is a fresh hidden sibling to fill and
    :func:`publish`, removed with all it holds if the body fails or is interrupted."""
    final = Path(parent) / name
    if final.exists():
        raise FileExistsError(f"checkpoint directory {final} already exists")
    tmp = staged_dir(final)
    try:
        yield tmp, final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
