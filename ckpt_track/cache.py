"""The download cache: a checkpoint fetched from a tracker lands in a local cache entry; a
verified copy already there is reused, and a content-addressed tensor file that another
cached version of the same run holds is linked instead of fetched again.

Every backend whose checkpoints are not already on local disk implements ``get`` as::

    def get(self, stored, dest):
        return cache.fetch(dest, own=lambda into: ..., blobs=lambda names, into: ...)

``own(into)`` writes the version's own files (at least ``manifest.json``) into ``into``;
``blobs(names, into)`` writes the named content-addressed files the version shares with
others of its run (kept once per run by the tracker).  Where the cache entry goes is decided
by the core (``resolve.cache_dir``).

A cached copy is re-hashed before it is reused, so that one that rotted since it was fetched is
fetched again; inside :func:`hashing_deferred` that is left to the caller, which hashes every
file itself before using any (a restore into live objects: each file is then hashed once).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .errors import CheckpointNotFound, IntegrityError
from .format import (
    MANIFEST,
    LocalCheckpoint,
    check_name,
    hash_file,
    is_blob,
    link_cached,
    read_manifest,
    seal,
    staged_dir,
    swap_in,
    verify,
)
from .format.copy import regular_of_size

__all__ = ["cache_dir", "cached", "fetch", "hashing_deferred"]

#: the cache entries reused unhashed inside :func:`hashing_deferred` (None outside it)
_DEFERRED: ContextVar[list[Path] | None] = ContextVar("ckpt_track_cache_deferred", default=None)


@contextmanager
def hashing_deferred() -> Iterator[list[Path]]:
    """Inside, :func:`cached` reuses a copy whose files are all present, regular and of their
    recorded sizes without re-hashing them: for a caller that hashes every file from the files
    it opens before it uses any (``restoring.restore_from``).  Yields the list of the entries so
    reused; when the caller's hashing refuses one, it fetches again outside this context, where
    a rotted copy is detected and fetched anew."""
    reused: list[Path] = []
    token = _DEFERRED.set(reused)  # a context variable: other threads keep hashing what they reuse
    try:
        yield reused
    finally:
        _DEFERRED.reset(token)

def cache_dir() -> Path:
    """Where checkpoints downloaded from remote trackers are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt_track"


Own = Callable[[Path], None]
Blobs = Callable[[Sequence[str], Path], None]


def cached(dest: Path, manifest_hash: str | None = None) -> LocalCheckpoint | None:
    """The verified checkpoint at ``dest``, or None when it is absent, damaged, partial or
    (``manifest_hash`` given) another version cached under the same path."""
    dest = Path(dest)
    if not (dest / MANIFEST).is_file():
        return None
    try:
        if manifest_hash is not None and hash_file(dest / MANIFEST) != manifest_hash:
            return None
        deferred = _DEFERRED.get()
        if deferred is None:
            return LocalCheckpoint(dest, verify(dest))
        manifest = read_manifest(dest)  # the caller hashes the files (see hashing_deferred)
        if not all(regular_of_size(dest / check_name(f, dest), e.size) for f, e in manifest.files.items()):
            return None  # partial or damaged: fetched again
        deferred.append(dest)
        return LocalCheckpoint(dest, manifest)
    except (IntegrityError, CheckpointNotFound, OSError):
        return None


def fetch(dest: Path, own: Own, blobs: Blobs | None = None, *, manifest_hash: str | None = None,
          where: str = "") -> LocalCheckpoint:
    """Make the checkpoint available at ``dest``: reuse a verified cached copy, else stage a
    sibling directory, fetch the version's own files, link what the cache already holds, fetch
    the missing shared files, and swap the result in.  A failure leaves ``dest`` as it was."""
    dest = Path(dest)
    hit = cached(dest, manifest_hash)
    if hit is not None:
        return hit
    tmp = staged_dir(dest)
    try:
        own(tmp)
        manifest = read_manifest(tmp)
        wanted = [f for f in manifest.files if is_blob(f) and not (tmp / f).is_file()]
        wanted = link_cached(tmp, manifest, wanted, dest)
        if wanted:
            if blobs is None:
                raise IntegrityError(f"{where or dest}: tensor file(s) {', '.join(wanted)} are missing from the "
                                     "downloaded checkpoint")
            blobs(wanted, tmp)
        seal(tmp)  # whatever mode the tracker's SDK gave the files: the umask's read bits, read-only
        swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LocalCheckpoint(dest, read_manifest(dest))
