"""From a reference to a backend, a run, one stored version, and its files.

This is the one place that turns a reference into a :class:`Stored` (:func:`resolve`, or a
:class:`Resolver` for many references) and decides where a download lands in the cache
(:func:`cache_path`): the library, the working tools (``ckpt_track.ops``) and the CLI all go
through it, so a reference means the same checkpoint everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import network
from .backends import registry
from .cache import cache_dir
from .config import STORAGE_SECTION, Settings, load_settings
from .errors import CheckpointNotFound, IntegrityError
from .external import is_record, materialize
from .format import LocalCheckpoint, verify
from .policy import select
from .protocol import Backend
from .records import RunInfo, Stored
from .refs import Ref, parse_ref

__all__ = ["Resolved", "Resolver", "RunListing", "cache_dir", "cache_path", "canonical", "list_stored",
           "open_backend", "resolve"]


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

    def run(self, ref: str | Ref) -> RunListing:
        """The run a reference points into; a selector, if any, is kept in ``.ref`` unapplied."""
        parsed = parse_ref(ref)
        backend = self.backend(parsed)
        canon = canonical(backend, parsed)  # logged-model / registry refs -> <run>:vN
        key = (canon.backend, canon.params, canon.path)
        if key not in self._runs:
            info = backend.find_run(canon)
            self._runs[key] = RunListing(backend, info, tuple(sorted(backend.list(info), key=lambda s: s.version)),
                                         canon)
        return replace(self._runs[key], ref=canon)  # the run is listed once; the selector is this ref's

    def resolve(self, ref: str | Ref) -> Resolved:
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


def resolve(ref: str | Ref, settings: Settings | None = None) -> Resolved:
    """Find the stored checkpoint a reference selects."""
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


def list_stored(ref: str | Ref, settings: Settings | None = None) -> list[Stored]:
    """Every checkpoint of the run a reference points into, oldest version first."""
    return list(Resolver(settings).run(ref).stored)
