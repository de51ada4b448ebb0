"""A checkpoint's own files as one zip: the package a ClearML model holds online, and how the
zips ClearML hands back (model packages, folder artifacts) are unpacked.

Stored, not deflated: safetensors barely compress, and extraction stays I/O-bound.  Every
member name is checked like a manifest's file names (``format.check_name``), so an archive
from the tracker can never write outside the directory it is unpacked into.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import IntegrityError
from ...format import LocalCheckpoint, check_name

__all__ = ["copy_member", "scratch_dir", "unzip", "zip_files"]

_CHUNK = 8 * 1024 * 1024


def zip_files(ckpt: LocalCheckpoint, names: Sequence[str], target: Path) -> None:
    """Write ``names`` of ``ckpt`` (flat, at the archive root) into the zip ``target``."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in names:
            zf.write(ckpt.path / name, arcname=name)


def unzip(archive: Any, into: Path) -> None:
    """Unpack a checkpoint zip (a path or an open file) into the folder ``into``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith("/"):
                    continue
                target = into / check_name(name, f"checkpoint archive {archive}")
                with zf.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"downloaded checkpoint archive is not a valid zip ({exc})") from exc


def copy_member(archive: Path, member: str, target: Path) -> None:
    """Copy one member of a zip (an offline session's) to the file ``target``."""
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def scratch_dir(near: Path) -> Path:
    """A new private folder to build a package in: next to the checkpoint (same disk), or the
    temp dir when that is read-only.  The caller removes it."""
    try:
        return Path(tempfile.mkdtemp(prefix=".ckpt_track-", dir=near))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="ckpt_track-"))
