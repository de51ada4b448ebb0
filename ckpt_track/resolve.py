"""From a reference to a backend, a run, one stored version, and its files."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import network
from .backends import registry
from .protocol import Backend
from .records import RunInfo, Stored
from .config import Settings, load_settings
from .errors import CheckpointNotFound, IntegrityError
from .format import LocalCheckpoint
from .policy import select
from .refs import Ref, parse_ref

__all__ = ["Resolved", "cache_dir", "canonical", "open_backend", "resolve", "list_stored"]


def cache_dir() -> Path:
    """Where checkpoints downloaded from remote trackers are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt_track"


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
    backend = registry.create(name, options)
    check = getattr(backend, "check_configured", None) if ref is not None else None
    if check is not None:
        check()
    return backend


@dataclass(frozen=True)
class Resolved:
    backend: Backend
    run: RunInfo
    stored: Stored

    def fetch(self) -> LocalCheckpoint:
        """The checkpoint on local disk; remote backends download into the cache."""
        run_ref = self.run.ref
        # the run's whole reference (entity, server, ...) keys the cache, so two runs that share
        # a project and id on different servers never share a slot
        where = hashlib.sha256(str(run_ref.params).encode()).hexdigest()[:10] if run_ref.params else "default"
        dest = cache_dir() / run_ref.backend / where / Path(*run_ref.segments) / f"v{self.stored.version}"
        return self.backend.get(self.stored, dest)


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


def resolve(ref: str | Ref, settings: Settings | None = None) -> Resolved:
    """Find the stored checkpoint a reference selects."""
    r = parse_ref(ref)
    backend = open_backend(r.backend, _settings(settings), r)
    r = canonical(backend, r)
    run = backend.find_run(r)
    stored = backend.list(run)
    try:
        found: Stored | None = select(stored, r)
    except CheckpointNotFound as exc:
        found, missing = None, exc
    _refuse_damaged(backend, run, r, found)
    if found is None:
        raise missing
    return Resolved(backend, run, found)


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
    r = parse_ref(ref)
    backend = open_backend(r.backend, _settings(settings), r)
    return backend.list(backend.find_run(canonical(backend, r)))
