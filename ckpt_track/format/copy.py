"""Copying checkpoints and their files: hard links where possible, never through a link.

A copy is published like a new checkpoint (staged, manifest last, renamed into
place).  A source file is opened once, as a regular file, and what was opened is
what is linked or copied, even if the name is swapped for a link in between.

Linking is safe because a committed checkpoint's files are read-only and never changed in
place (:mod:`.modes`); :func:`linking` turns it off, or counts the links made, for every
:func:`copy_checkpoint` in its context (``ops.copy.copy(link=False)``: an independent copy).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointNotFound, IntegrityError
from .atomic import publish, staging
from .files import check_name, chunks, open_regular
from .hashing import hash_file, is_blob
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, LocalCheckpoint, Manifest, read_manifest
from .modes import seal


@dataclass
class Links:
    """What :func:`linking` yields: ``allowed`` is whether copies may hard-link, ``linked``
    counts the files hard-linked so far."""

    allowed: bool = True
    linked: int = 0


_LINKS: ContextVar[Links | None] = ContextVar("ckpt_track_links", default=None)


@contextmanager
def linking(allowed: bool = True) -> Iterator[Links]:
    """Inside, :func:`copy_checkpoint` hard-links only when ``allowed`` (else every file is
    an independent copy, with its own inode) and counts the files it links.

    >>> with linking(False) as links:  # doctest: +SKIP
    ...     copy_checkpoint(ckpt, parent, "v000002")
    """
    links = Links(allowed)
    token = _LINKS.set(links)  # a context variable: other threads' copies are not affected
    try:
        yield links
    finally:
        _LINKS.reset(token)


def copy_checkpoint(src: LocalCheckpoint, parent: Path, name: str, *, link: bool = True,
                    progress: Any = None, sources: Mapping[str, Path] | None = None) -> LocalCheckpoint:
    """Copy (or hard-link when ``link`` and on the same filesystem) a checkpoint,
    manifest last, publishing atomically; the copy's files are read-only (:func:`seal`).
    ``progress(nbytes)`` is called as bytes move.  ``sources`` names another file with the
    same contents to take a file from (a content-addressed tensor file already in the
    destination store).  See :func:`linking`."""
    sources = sources or {}
    links = _LINKS.get()
    link = link and (links is None or links.allowed)
    with staging(parent, name) as (tmp, final):
        for fname, entry in src.manifest.files.items():
            check_name(fname, src.path)
            linked = copy_one(sources.get(fname, src.path / fname), tmp / fname, link=link, expected=entry.size)
            if linked and links is not None:
                links.linked += 1
            if progress is not None:
                progress(entry.size)
        copy_one(src.path / MANIFEST, tmp / MANIFEST, link=False, limit=MAX_MANIFEST_BYTES)
        seal(tmp)  # copies get the umask's read bits; links are sealed already
        publish(tmp, final)
    return LocalCheckpoint(final, src.manifest)


def link_cached(dest: Path, manifest: Manifest, names: Iterable[str], entry: Path) -> list[str]:
    """Hard-link (or copy) into ``dest`` each named content-addressed file that another version
    of the same run in the download cache (a ``v*`` sibling of the cache ``entry`` being filled)
    holds with the size and hash ``manifest`` records; returns the names still to download."""
    held = _cached_blobs(manifest, Path(entry))
    missing = []
    for fname in names:
        src = held.get(fname)
        try:  # hashing a cached file is far cheaper than downloading it, and a damaged one is skipped
            if src is None or not regular_of_size(src, manifest.files[fname].size) or \
                    hash_file(src) != manifest.files[fname].hash:
                raise FileNotFoundError(fname)
            copy_one(src, Path(dest) / check_name(fname, dest), link=True, expected=manifest.files[fname].size)
        except (OSError, IntegrityError):
            missing.append(fname)
    return missing


def _cached_blobs(manifest: Manifest, entry: Path) -> dict[str, Path]:
    """Where the cached siblings of ``entry`` hold a content-addressed file of ``manifest``
    (as their manifests record it: the file itself is checked by the caller)."""
    siblings = [d for d in entry.parent.glob("v*") if d.is_dir() and d != entry] if entry.parent.is_dir() else []
    held: dict[str, Path] = {}
    for sib in siblings:
        try:
            other = read_manifest(sib)
        except (CheckpointNotFound, IntegrityError, OSError):
            continue
        if other.hash_algorithm != manifest.hash_algorithm:
            continue
        for fname, recorded in other.files.items():
            if is_blob(fname) and fname not in held and manifest.files.get(fname) == recorded:
                held[fname] = sib / fname
    return held


def reusable(fname: str, reuse: Iterable[LocalCheckpoint]) -> tuple[Path, FileEntry] | None:
    """The first of the ``reuse`` checkpoints' copies of ``fname`` that is still a regular file
    of the recorded size, with its manifest entry (None when none is)."""
    for ckpt in reuse:
        entry = ckpt.manifest.files.get(fname)
        if entry is not None:
            src = ckpt.path / fname
            if regular_of_size(src, entry.size):
                return src, entry
    return None


def regular_of_size(path: Path, size: int) -> bool:
    """True when ``path`` itself (not a link's target) is a regular file of ``size`` bytes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def copy_one(src: Path, dst: Path, *, link: bool, expected: int | None = None, limit: int | None = None) -> bool:
    """Hard-link or copy one regular file (never a link's target; see :func:`open_regular`),
    of exactly ``expected`` bytes when given, else of at most ``limit``; True when linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open_regular(src, limit) as f:
        st = os.fstat(f.fileno())
        if expected is not None and st.st_size != expected:
            raise IntegrityError(f"{src}: size {st.st_size} bytes, manifest says {expected} (truncated or modified)")
        if link and _link_same(src, dst, st):
            return True
        with open(dst, "wb") as out:
            _copy_bytes(f, out, st.st_size, src)
            out.flush()
            os.fsync(out.fileno())
    return False


def _link_same(src: Path, dst: Path, opened: os.stat_result) -> bool:
    """Hard-link ``src`` to ``dst`` if it is still the file that was opened (not swapped for a link)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return False  # other filesystem or no hard links: copy instead
    got = os.lstat(dst)
    if (got.st_dev, got.st_ino) == (opened.st_dev, opened.st_ino):
        return True
    os.unlink(dst)  # src was replaced after it was opened: copy what was opened instead
    return False


def _copy_bytes(f: BinaryIO, out: BinaryIO, size: int, where: Path) -> None:
    # writelines takes one chunk at a time, so the reused buffer is written before it is refilled
    out.writelines(chunks(f, size, lambda left: IntegrityError(
        f"{where} ended {left} bytes early while being copied (truncated)")))
