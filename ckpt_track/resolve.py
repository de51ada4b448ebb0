"""From a reference to a backend, a run, one stored version, and its files.

This is the one place that turns a reference into a :class:`Stored` (:func:`resolve`, or a
:class:`Resolver` for many references) and decides where a download lands in the cache
(:func:`cache_path`): the library, the working tools (``ckpt_track.ops``) and the CLI all go
through it, so a reference means the same checkpoint everywhere.

A checkpoint directory on local disk (what ``ckpt-track restore -o DIR`` and ``average -o DIR``
write: a directory holding ``manifest.json``) is accepted wherever a reference is: it reads as
a run of one version (:class:`CheckpointDirectory`), verified like any stored checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from . import network
from .backends import registry
from .cache import cache_dir
from .config import STORAGE_SECTION, Settings, load_settings
from .errors import CheckpointNotFound, ConfigError, IntegrityError
from .external import is_record, materialize
from .format import MANIFEST, LocalCheckpoint, read_manifest, verify
from .policy import select
from .protocol import Backend
from .records import RunInfo, Stored
from .refs import Ref, parse_ref

registry.use_settings(load_settings)  # an ambiguous self-hosted URL is matched by the configured servers

__all__ = ["CheckpointDirectory", "PathRef", "Resolved", "Resolver", "RunListing", "cache_dir", "cache_path",
           "canonical", "checkpoint_dir", "list_stored", "open_backend", "resolve"]

RefLike = str | Ref | os.PathLike[str]


def cache_path(run_ref: Ref, version: int) -> Path:
    """The cache entry of version ``version`` of the run ``run_ref``.

    The run's whole reference (entity, server, ...) keys the entry, so two runs that share
    a project and id on different servers never share a slot."""
    where = hashlib.sha256(str(run_ref.params).encode()).hexdigest()[:10] if run_ref.params else "default"
    return cache_dir() / run_ref.backend / where / Path(*run_ref.segments) / f"v{version}"


def open_backend(name: str, settings: Settings, ref: Ref | None = None) -> Backend:
    """A backend configured by its settings section; parameters in ``ref`` (e.g. ``?root=``) win.

    SDK timeouts, retries and telemetry are set first (:func:`ckpt_track.network.configure`).
    With a ``ref``, a backend's optional ``check_configured()`` hook runs before anything else:
    it raises ``ConfigError`` when nothing names the tracker to contact, so resolving a
    reference never falls back on a vendor's default server or a store in the working directory.
    """
    network.configure(settings)
    options: dict[str, Any] = settings.backend_options(name)
    if ref is not None:
        options.update(dict(ref.params))
    if getattr(registry.get_class(name), "uses_storage", False):
        options["storage"] = settings.backend_options(STORAGE_SECTION)
    backend = registry.create(name, options)
    check = getattr(backend, "check_configured", None) if ref is not None else None
    if check is not None:
        check()
    return backend


@dataclass(frozen=True)
class Resolved:
    """One stored version, with the backend and run it belongs to."""

    backend: Backend
    run: RunInfo
    stored: Stored
    settings: Settings | None = None  # for a record whose files are in object storage: how to reach it

    def fetch(self) -> LocalCheckpoint:
        """The checkpoint on local disk; remote backends download into the cache, and a record
        whose files are in object storage (``[storage] url``) is completed from the bucket."""
        dest = cache_path(self.run.ref, self.stored.version)
        ckpt = self.record()
        if is_record(ckpt):
            settings = self.settings if self.settings is not None else load_settings()
            return materialize(ckpt, settings, dest.with_name(f"{dest.name}-files"))
        return ckpt

    def record(self) -> LocalCheckpoint:
        """What the tracker holds, on local disk: the checkpoint, or a record whose files are in
        object storage (``ckpt_track.external``)."""
        return self.backend.get(self.stored, cache_path(self.run.ref, self.stored.version))

    def fetch_verified(self) -> LocalCheckpoint:
        """The checkpoint on local disk, every file re-hashed against its manifest first: for
        work that reads the files' contents (diff, average, copy), where a cached copy that
        rotted since it was fetched must not pass unnoticed."""
        ckpt = self.fetch()
        return LocalCheckpoint(ckpt.path, verify(ckpt.path))


@dataclass(frozen=True)
class RunListing:
    """A run a reference points into: its backend, its record, its checkpoints (oldest version
    first) and the reference in canonical form (``<run>`` plus the selector, if any)."""

    backend: Backend
    run: RunInfo
    stored: tuple[Stored, ...]
    ref: Ref


class Resolver:
    """Resolve many references under one set of settings, opening each backend and listing each
    run once: a lineage walk or a diff visits one run many times, and listing a remote run is a
    round trip (its damaged-version warnings would repeat too).

    ``skip_damaged=True`` selects among the intact versions only, as the working tools
    (``ckpt_track.ops``) always have: a damaged version a reference means is then skipped with
    the listing's warning instead of raising :class:`IntegrityError` as :func:`resolve` does."""

    def __init__(self, settings: Settings | None = None, *, skip_damaged: bool = False) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.skip_damaged = skip_damaged
        self._backends: dict[tuple[str, tuple[tuple[str, str], ...]], Backend] = {}
        self._runs: dict[tuple[str, tuple[tuple[str, str], ...], str], RunListing] = {}

    def backend(self, ref: Ref) -> Backend:
        """The backend ``ref`` names, configured by the settings and the reference's parameters."""
        key = (ref.backend, ref.params)
        if key not in self._backends:
            self._backends[key] = open_backend(ref.backend, self.settings, ref)
        return self._backends[key]

    def run(self, ref: RefLike) -> RunListing:
        """The run a reference points into; a selector, if any, is kept in ``.ref`` unapplied.
        A checkpoint directory is a run of one version (:class:`CheckpointDirectory`)."""
        where = checkpoint_dir(ref)
        if where is not None:
            folder = CheckpointDirectory(where)
            return RunListing(folder, folder.run, tuple(folder.list(folder.run)), folder.run.ref)
        assert not isinstance(ref, os.PathLike)  # checkpoint_dir() took every path
        parsed = parse_ref(ref)
        backend = self.backend(parsed)
        canon = canonical(backend, parsed)  # logged-model / registry refs -> <run>:vN
        key = (canon.backend, canon.params, canon.path)
        if key not in self._runs:
            info = backend.find_run(canon)
            self._runs[key] = RunListing(backend, info, tuple(sorted(backend.list(info), key=lambda s: s.version)),
                                         canon)
        return replace(self._runs[key], ref=canon)  # the run is listed once; the selector is this ref's

    def resolve(self, ref: RefLike) -> Resolved:
        """The stored checkpoint a reference selects; a damaged version it means is an error."""
        listing = self.run(ref)
        try:
            found: Stored | None = select(listing.stored, listing.ref)
        except CheckpointNotFound as exc:
            found, missing = None, exc
        if not self.skip_damaged:
            _refuse_damaged(listing.backend, listing.run, listing.ref, found)
        if found is None:
            raise missing
        return Resolved(listing.backend, listing.run, found, self.settings)


def resolve(ref: RefLike, settings: Settings | None = None) -> Resolved:
    """Find the stored checkpoint a reference (or a checkpoint directory) selects."""
    return Resolver(settings).resolve(ref)


def _refuse_damaged(backend: Backend, run: RunInfo, ref: Ref, found: Stored | None) -> None:
    """A damaged version the reference means (by number, by an alias on it, or the newest one
    when nothing intact matches) is an IntegrityError, never silently another version."""
    hook = getattr(backend, "damaged", None)
    if hook is None:
        return
    for version, (aliases, why) in sorted(hook(run).items()):
        newest = found is not None and not ref.selector and version > found.version
        if ref.version == version or (ref.alias is not None and ref.alias in aliases) or found is None or newest \
                or (not ref.selector and "latest" in aliases):
            raise IntegrityError(f"{ref}: version v{version} of this run is damaged, nothing was loaded: {why}")


def canonical(backend: Backend, ref: Ref) -> Ref:
    """A reference to a non-run object (logged model, registry version) as ``<run>:vN``,
    via the backend's optional ``resolve_ref`` hook; other references unchanged."""
    hook = getattr(backend, "resolve_ref", None)
    return hook(ref) if hook is not None else ref


def list_stored(ref: RefLike, settings: Settings | None = None) -> list[Stored]:
    """Every checkpoint of the run a reference points into, oldest version first."""
    return list(Resolver(settings).run(ref).stored)


# --------------------------------------------------------------------------- checkpoint directories


def checkpoint_dir(ref: object) -> Path | None:
    """The checkpoint directory ``ref`` names, or None when ``ref`` is meant as a reference.

    A ``Path`` (any ``os.PathLike``), or a string without ``://`` that names something on disk,
    is a path; it must be a directory holding ``manifest.json`` (or that file itself), else
    :class:`CheckpointNotFound` says so.  Any other string is left to :func:`parse_ref`, so a
    string that is neither gives the reference error."""
    if isinstance(ref, Ref):
        return None
    if isinstance(ref, os.PathLike):
        text = os.fspath(ref)
    elif isinstance(ref, str) and "://" not in ref and os.path.lexists(os.path.expanduser(ref)):
        text = ref
    else:
        return None
    path = Path(text).expanduser().absolute()
    if path.name == MANIFEST and path.is_file():
        path = path.parent
    if not path.exists():
        _not_a_checkpoint(path, "does not exist")
    if not path.is_dir():
        _not_a_checkpoint(path, "is a file, not a checkpoint directory")
    if not (path / MANIFEST).exists():
        _not_a_checkpoint(path, f"is a directory but not a checkpoint (it holds no {MANIFEST})")
    return path


def _not_a_checkpoint(path: Path, why: str) -> NoReturn:
    raise CheckpointNotFound(f"{path} {why}; give a checkpoint directory (what `ckpt-track restore -o DIR` or "
                             "`average -o DIR` writes) or a reference such as local://PROJECT/RUN@best")


@dataclass(frozen=True)
class PathRef(Ref):
    """The reference of a checkpoint directory: prints as the directory's path.  ``path`` holds a
    digest of it, so two directories never share a run key (lineage walks, caches)."""

    where: str = ""

    def __str__(self) -> str:
        return self.where


class CheckpointDirectory:
    """A checkpoint directory on local disk, read as a run of one version (v1) through the
    backend Protocol, so every verb and ``ct.restore`` treat it like a stored checkpoint: its
    files are hashed against its manifest before anything reads them.  Read-only."""

    name: ClassVar[str] = "dir"
    options: ClassVar[frozenset[str]] = frozenset()
    capabilities: ClassVar[frozenset[str]] = frozenset()  # no delete: gc refuses, as for any such backend

    def __init__(self, path: Path) -> None:
        self.path = path
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
        ref = PathRef(self.name, digest, where=str(path))
        self.run = RunInfo(backend=self.name, project=str(path.parent), run_id=str(path), name=str(path), ref=ref)

    def find_run(self, ref: Ref) -> RunInfo:
        return self.run

    def list(self, run: RunInfo) -> list[Stored]:
        m = read_manifest(self.path)  # a damaged manifest is an IntegrityError here, as in a store
        return [Stored(ref=run.ref.select(version=1), run=run, version=1, step=m.step, epoch=m.epoch,
                       metrics=dict(m.metrics), size=m.size, created=m.created, lineage=dict(m.lineage))]

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        return LocalCheckpoint(self.path, read_manifest(self.path))  # in place: nothing to download

    def run_config(self, run: RunInfo) -> None:
        return None  # a checkpoint holds the config's hash only; its tracker holds the config

    def _read_only(self, *_: object) -> NoReturn:
        raise ConfigError(f"{self.path} is a checkpoint directory, read-only here; to record it in a run, "
                          f"use `ckpt-track copy {self.path} --to BACKEND://PROJECT/NAME`")

    open_run = put = set_aliases = delete = link_input = _read_only

    def finish_run(self, run: RunInfo) -> None:
        return None

    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return None

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return ("DIR                             a checkpoint directory (holding manifest.json)",)
