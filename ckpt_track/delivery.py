"""Delivery: the trackers a run writes to, and how a spooled checkpoint gets into each one.

A save is the commit to the spool (:mod:`ckpt_track.spool`); everything after that is here
and runs on the upload thread (:mod:`ckpt_track.uploader`): opening a tracker run that was
unreachable at ``init``, sweeping what a killed process or a failed put left half-created,
storing each checkpoint with the aliases it earns (``latest``, ``best``, ``step-N``), and
applying retention.  Kept apart from :class:`ckpt_track.run.Run` (the training thread's API)
so that the crash-safety rules of the upload side can be read in one place:

- a put is idempotent: a version the tracker already holds (same step and ``created``) is
  completed, never stored twice;
- ``latest`` goes to the highest step, whatever order the uploads happen in;
- a backend where a put failed part way is swept before its next put.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_ROOT, Settings, load_settings
from .errors import BackendUnavailable, CkptTrackError, ConfigError
from .external import complete, externalize, forget, is_record, register, storage_url
from .format import LocalCheckpoint
from .objstore import is_url
from .policy import best_of, is_improvement, retention_plan
from .protocol import Backend
from .records import RunInfo, RunSpec, Stored
from .refs import Ref
from .replicas import replica_urls, retry_pending, schedule
from .resolve import open_backend
from .spool import DrainResult, Spool

__all__ = ["Delivery", "Spooled", "already_stored", "open_spool", "open_targets", "provisional"]

log = logging.getLogger("ckpt_track")
Target = tuple[Backend, RunInfo]


@dataclass(frozen=True)
class Spooled:
    """A checkpoint committed to this machine's spool, restored in place: no backend is asked
    (the tracker may be the one that is down).  Has what :func:`restore_from` reads of a
    :class:`Resolved`: ``stored.ref`` and ``fetch()``."""

    stored: Stored
    ckpt: LocalCheckpoint
    settings: Settings | None = None

    def record(self) -> LocalCheckpoint:
        return self.ckpt

    def fetch(self) -> LocalCheckpoint:
        """The spooled checkpoint; a record (a multi-rank save with ``[storage] url``) is
        completed from the bucket into the cache."""
        return complete(self.ckpt, self.settings or load_settings()) if is_record(self.ckpt) else self.ckpt


def open_targets(settings: Settings, spec: RunSpec) -> tuple[list[Target], dict[str, BaseException]]:
    """Open the run in every configured backend.  A tracker that is unreachable never blocks
    training (unless ``resume="must"``, which needs it to know the run exists): it gets a
    provisional run, opened for real by the upload thread once the tracker is back."""
    targets: list[Target] = []
    deferred: dict[str, BaseException] = {}
    for bname in settings.checked_backends():
        be = open_backend(bname, settings)
        try:
            info = be.open_run(spec)
        except BackendUnavailable as exc:
            if spec.resume == "must":
                raise
            info = provisional(be.name, spec)
            deferred[be.name] = exc
            log.warning("ckpt_track: %s is unreachable (%s); training starts now with provisional run %s, "
                        "checkpoints are kept on disk and uploaded when it is back", bname,
                        str(exc).splitlines()[0][:300], info.run_id)
        targets.append((be, info))
    return targets, deferred


@dataclass(frozen=True)
class Provisional:
    """``RunInfo.native`` of a run its tracker has not opened yet (no backend reads it)."""


def provisional(backend: str, spec: RunSpec) -> RunInfo:
    """A stand-in for a run its tracker could not open yet (the id the user chose, or a fresh
    ``deferred-*`` one)."""
    run_id = spec.run_id or f"deferred-{uuid.uuid4().hex[:12]}"
    return RunInfo(backend=backend, project=spec.project, run_id=run_id, name=spec.name or run_id,
                   ref=Ref(backend, run_id), resumed=False, native=Provisional())


def spool_root(settings: Settings) -> str:
    """The local directory whose ``.spool`` holds a run's committed checkpoints: the local store's
    root, or ``./ckpt_runs`` when that root is an object-store URL (the spool is always on this
    machine's disk, so a save never waits on the network)."""
    root = str(settings.backend_options("local").get("root") or "")
    return DEFAULT_ROOT if not root or is_url(root) else root.removeprefix("file://")


def open_spool(settings: Settings, spec: RunSpec, targets: Sequence[Target], deferred: bool) -> Spool:
    """The run's spool, under the local store's root.  It adopts what an earlier process of this
    run left: by the run's real id, by the provisional prefix it was spooled under, or (when the
    run is resumed by name) by the name a deferred process recorded."""
    info = targets[0][1]
    project = info.project
    root = Path(spool_root(settings)).expanduser().absolute()
    ids = {info.run_id, *(i.run_id for _, i in targets)}
    spool = Spool(
        root / ".spool", f"{project}-{info.run_id}-", [b.name for b, _ in targets],
        adopt=lambda meta: meta.get("project") == project and (
            meta.get("real_id") in ids or meta.get("prefix") == f"{project}-{spec.run_id}-"
            or (spec.name is not None and spec.resume != "never" and meta.get("name") == spec.name)),
    )
    if deferred:
        spool.record_deferred({"project": project, "name": spec.name, "real_id": None})
    return spool


def already_stored(stored: Sequence[Stored], ckpt: LocalCheckpoint) -> Stored | None:
    """The version that is this very checkpoint (same step and creation time), if any."""
    m = ckpt.manifest
    return next((s for s in stored if s.step == m.step and m.created and s.created == m.created), None)


class Delivery:
    """The run's ``(backend, run)`` targets, primary first, and the upload pass over them.

    ``targets`` is one list, replaced in place when a deferred run opens, so readers on the
    training thread see either the provisional or the real run, never a torn pair."""

    def __init__(self, settings: Settings, spec: RunSpec, targets: Sequence[Target],
                 deferred: Mapping[str, BaseException] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.targets: list[Target] = list(targets)
        # backends whose tracker was unreachable at init: their RunInfo is provisional until
        # the upload thread reaches them and opens the run
        self.deferred: dict[str, BaseException] = dict(deferred or {})
        if replica_urls(settings) and storage_url(settings) is None:
            raise ConfigError("[storage] replicas are copies of [storage] url: set [storage] url too "
                              "(replicas of a bucket store given as [local] root are not supported)")
        self.spool = open_spool(settings, spec, self.targets, bool(self.deferred))
        self._swept: set[str] = set()
        self._dirty: set[str] = set()  # backends where a put failed part way since the last sweep
        self._lock = threading.Lock()

    # -- the upload pass (upload thread) ---------------------------------------------------
    def drain(self, retry: bool = False) -> DrainResult:
        """Store every spooled checkpoint in every backend that is owed it; ``retry``: give the
        backends that refused one another try first."""
        if retry:
            self.spool.retry_refused()
        retry_pending(self.settings, self.spool.root)  # replicas owed by earlier passes
        if self.deferred:
            self._open_deferred()
        self._sweep()
        targets = {b.name: (b, info) for b, info in self.targets}
        result = self.spool.drain(lambda name, ckpt, aliases: self.put(*targets[name], ckpt, aliases),
                                  down=set(self.deferred))
        for name, exc in self.deferred.items():
            result.deferred.append(f"{name}: {exc}")
        if result.deferred:
            log.warning("ckpt_track: %s; the checkpoint is kept on disk and will be uploaded when the tracker "
                        "is back (retried in the background and at finish())", "; ".join(result.deferred))
        for msg, _exc in result.failures:
            log.error("ckpt_track: checkpoint not stored: %s", msg)
        return result

    def _open_deferred(self) -> None:
        """Open the tracker runs that were unreachable at init."""
        for i, (backend, info) in enumerate(self.targets):
            if backend.name not in self.deferred:
                continue
            try:
                real = backend.open_run(self.spec)
            except BackendUnavailable as exc:
                self.deferred[backend.name] = exc
                continue
            except Exception as exc:  # noqa: BLE001 - refused (auth, configuration): reported, tried next pass
                self.deferred[backend.name] = exc
                log.error("ckpt_track: could not open the run in %s: %s", backend.name, exc)
                continue
            with self._lock:
                self.targets[i] = (backend, real)
                del self.deferred[backend.name]
            log.warning("ckpt_track: %s is reachable again; run %s is now %s", backend.name, info.run_id, real.ref)
            if i == 0:
                self.spool.record_deferred({"project": real.project, "name": self.spec.name,
                                            "real_id": real.run_id})

    def _sweep(self) -> None:
        """Remove what a killed process (once per backend, for a resumed run) or a put that failed
        part way left half-created in the tracker."""
        for backend, info in self.targets:
            hook = getattr(backend, "sweep", None)
            due = backend.name in self._dirty or (info.resumed and backend.name not in self._swept)
            if hook is None or not due or backend.name in self.deferred:
                continue
            try:
                hook(info)
            except BackendUnavailable:
                continue
            except Exception as exc:  # noqa: BLE001 - a failed clean-up must not stop the uploads
                log.warning("ckpt_track: could not clean up leftovers in %s: %s", backend.name, exc)
            self._swept.add(backend.name)
            self._dirty.discard(backend.name)

    def put(self, backend: Backend, info: RunInfo, ckpt: LocalCheckpoint, user_aliases: tuple[str, ...]) -> Stored:
        """Store one checkpoint in one backend, deciding its aliases; then apply retention.

        Idempotent: a checkpoint the tracker already holds (same step and creation time: an
        earlier attempt whose answer was lost, or a process killed before it noted the upload)
        is recognised and completed, not stored twice."""
        before = backend.list(info)
        done = already_stored(before, ckpt)
        aliases = self._aliases(ckpt, [s for s in before if s is not done], user_aliases)
        if done is not None:
            backend.set_aliases(done, [a for a in aliases if a not in done.aliases])
            stored = done
        else:
            stored = self._store(backend, info, ckpt, aliases)
        if self.settings.retention.enabled():  # listing a remote run is not free: only when needed
            monitor, mode = self.settings.monitor, self.settings.mode
            for old in retention_plan(backend.list(info), self.settings.retention, monitor, mode):
                backend.delete(old)
                try:
                    forget(old, self.settings)  # its files in object storage, when [storage] url holds them
                except CkptTrackError as exc:
                    log.warning("ckpt_track: could not release the objects of %s (left to `ckpt-track gc`): %s",
                                old.ref, exc)
        return stored

    def _aliases(self, ckpt: LocalCheckpoint, others: Sequence[Stored], user_aliases: tuple[str, ...]) -> list[str]:
        """``step-N`` and the user's aliases; ``latest`` when no other version has a higher step
        (uploads may happen out of order); ``best`` when it improves on every other version."""
        monitor, mode = self.settings.monitor, self.settings.mode
        aliases = [f"step-{ckpt.step}", *user_aliases]
        if all(s.step <= ckpt.step for s in others):
            aliases.insert(0, "latest")
        new_value = ckpt.manifest.metrics.get(monitor) if monitor else None
        if new_value is not None:
            current = best_of(others, monitor, mode)
            if is_improvement(new_value, current.metrics.get(monitor) if current else None, mode):  # type: ignore[arg-type]
                aliases.append("best")
        return aliases

    def _store(self, backend: Backend, info: RunInfo, ckpt: LocalCheckpoint, aliases: list[str]) -> Stored:
        """``backend.put`` (of a record, its files first uploaded to the bucket, when
        ``[storage] url`` is set); a failure marks the backend for a sweep, and one whose work was
        done (its answer lost) is completed instead of failing."""
        url = storage_url(self.settings)
        if url is None:
            return self._put(backend, info, ckpt, aliases)
        if is_record(ckpt):  # sealed already (a multi-rank save sends its shards from every rank)
            record, key = ckpt, register(ckpt, self.settings, backend.name, info.project, info.run_id)
        else:
            record, key = externalize(ckpt, self.settings, url, backend.name, info.project, info.run_id,
                                      self.spool.root / ".records")
        try:
            stored = self._put(backend, info, record, aliases)
        finally:
            if record is not ckpt:
                shutil.rmtree(record.path, ignore_errors=True)
        try:  # committed with the first copy: the replicas follow (retried on later passes when they fail)
            schedule(self.settings, url, key, self.spool.root)
        except CkptTrackError as exc:
            log.warning("ckpt_track: replicas of step %s are owed and will be retried: %s", ckpt.step, exc)
        return stored

    def _put(self, backend: Backend, info: RunInfo, ckpt: LocalCheckpoint, aliases: list[str]) -> Stored:
        try:
            return backend.put(info, ckpt, aliases)
        except BackendUnavailable:
            self._dirty.add(backend.name)  # a half-made record may be left: swept when it is back
            raise
        except Exception:
            self._dirty.add(backend.name)
            # the tracker may have done the work and lost its answer: look before failing
            done = already_stored(backend.list(info), ckpt)
            if done is None:
                raise
            backend.set_aliases(done, aliases)
            return done

    # -- finishing ---------------------------------------------------------------------------
    def sweep_all_settled(self) -> bool:
        """Mark for one last sweep every reachable tracker that is owed nothing: an SDK's own
        retry of a create whose answer was lost leaves a half-made record no put saw fail.
        True when a pass is needed for it."""
        owing = {b for p in self.spool.items for b in p.backends}
        self._dirty |= {b.name for b, _ in self.targets} - owing - set(self.deferred)
        return bool(self._dirty)

    def finish_runs(self) -> None:
        """Close the run in every tracker that has it (not in those still deferred)."""
        for backend, info in self.targets:
            if backend.name in self.deferred:
                continue
            try:
                backend.finish_run(info)
            except CkptTrackError as exc:
                log.warning("ckpt_track: could not close the run in %s: %s", backend.name, exc)
