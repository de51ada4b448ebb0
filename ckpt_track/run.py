"""The Run: ``init`` / ``resume`` / ``log_checkpoint`` / ``finish``; owns backends and writer."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError

from . import lineage as _lineage
from .protocol import Backend
from .records import ResumeMode, RunInfo, RunSpec, Stored
from .backends.local import DEFAULT_ROOT
from .config import Settings, load_settings
from .errors import (
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
    SerializationError,
)
from .format import (
    LocalCheckpoint,
    write_checkpoint,
)
from .policy import best_of, is_improvement, retention_plan, select
from .refs import Ref
from .resolve import Resolved, list_stored, open_backend, resolve
from .restoring import restore_from
from .spool import DrainResult, Pending, Spool
from .uploader import Uploader
from .state import Restored, capture
from .writer import Writer, snapshot_tensors, wait_staged

__all__ = ["CheckpointHandle", "Run", "init", "list_checkpoints", "log_checkpoint", "restore"]

log = logging.getLogger("ckpt_track")
_UNSET: Any = object()
_active: Run | None = None
_RESERVED_ALIASES = frozenset({"latest", "best"})


class CheckpointHandle:
    """Returned by ``log_checkpoint`` at once; the save may still be running.

    ``ref`` is usable right away (``<run>@step=N``); ``wait()`` returns the
    :class:`Stored` version once written, or raises :class:`CheckpointWriteError`.
    """

    def __init__(self, step: int, ref: Ref, future: Future[Pending], writer: Writer | None = None) -> None:
        self.step = step
        self.ref = ref
        self._future = future  # the commit to the spool; then Pending.first is the first upload
        self._writer = writer

    def done(self) -> bool:
        return self._future.done() and (self._future.exception() is not None or self._future.result().first.done())

    def wait(self, timeout: float | None = None) -> Stored | None:
        """The stored version once the first tracker has it, or None when the upload was
        deferred (tracker unreachable: the checkpoint waits on disk and is uploaded later).
        Raises :class:`CheckpointWriteError` when it could not be written, or a tracker refused it
        (it is kept on disk then, and the next process of the run retries it)."""
        try:
            try:
                item = self._future.result(timeout)
            except BaseException as exc:
                if self._writer is not None:
                    self._writer.acknowledge(exc)  # seen here: not raised again by the next call
                raise
            return item.first.result(timeout)
        except CheckpointWriteError:
            raise
        except CkptTrackError as exc:
            raise CheckpointWriteError(f"checkpoint at step {self.step} was not saved: {exc}") from exc

    @property
    def stored(self) -> Stored | None:
        return self.wait()

    def __repr__(self) -> str:
        return f"<CheckpointHandle {self.ref} {'done' if self.done() else 'pending'}>"


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise SerializationError(f"metric names must be str, got {k!r}")
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise SerializationError(f"metric {k!r} is a tensor of shape {tuple(v.shape)}, not a scalar")
            v = v.item()
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise SerializationError(f"metric {k!r} must be a number, got {type(v).__qualname__}") from None
    return out


class Run:
    """A training run recording checkpoints to one or more backends.  Create with :func:`init`."""

    def __init__(self, settings: Settings, spec: RunSpec, targets: Sequence[tuple[Backend, RunInfo]],
                 deferred: Mapping[str, BaseException] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self._targets = list(targets)
        # backends whose tracker was unreachable at init: their RunInfo is provisional until
        # the upload thread reaches them and opens the run
        self._deferred: dict[str, BaseException] = dict(deferred or {})
        self._swept: set[str] = set()
        self._dirty: set[str] = set()  # backends where a put failed part way since the last sweep
        self._writer = Writer(settings.max_in_flight)
        spool_root = Path(settings.backend_options("local").get("root") or DEFAULT_ROOT).expanduser().absolute()
        ids = {self.id, *(info.run_id for _, info in self._targets)}
        self._spool = Spool(
            spool_root / ".spool", f"{self.project}-{self.id}-", [b.name for b, _ in self._targets],
            adopt=lambda meta: meta.get("project") == self.project and (
                meta.get("real_id") in ids or meta.get("prefix") == f"{self.project}-{spec.run_id}-"
                or (spec.name is not None and spec.resume != "never" and meta.get("name") == spec.name)),
        )
        if self._deferred:
            self._spool.record_deferred({"project": self.project, "name": spec.name, "real_id": None})
        self._finished = False
        self._parent: str | None = None  # the checkpoint the next one continues from
        self._resumed_from: str | None = None
        self._lock = threading.Lock()
        env = _lineage.environment()
        self._static_lineage = {
            "run": str(self.ref),
            "config_hash": _lineage.config_hash(spec.config),
            "git": _lineage.git_info(),
            **env,
        }
        try:
            existing = self._primary_backend.list(self.info) if self.info.resumed else []
        except BackendUnavailable:
            existing = []
        if existing:
            self._parent = str(select(existing, self.ref).ref)
        weak = weakref.ref(self)
        self._atexit = lambda: (r := weak()) is not None and r._finish_at_exit()
        atexit.register(self._atexit)
        self._uploader = Uploader(self._drain)
        self._uploader.kick()  # uploads a previous process owed this run go first; clean up what it left

    # -- identity -----------------------------------------------------------------------
    @property
    def info(self) -> RunInfo:
        return self._targets[0][1]

    @property
    def _primary_backend(self) -> Backend:
        return self._targets[0][0]

    @property
    def id(self) -> str:
        return self.info.run_id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def project(self) -> str:
        return self.info.project

    @property
    def ref(self) -> Ref:
        """This run's reference, e.g. ``local://resnet/3k2j1x``."""
        return self.info.ref

    @property
    def resumed(self) -> bool:
        """True when ``init`` attached to a run that already existed."""
        return self.info.resumed

    def __repr__(self) -> str:
        return f"<Run {self.ref} name={self.name!r}>"

    # -- logging ----------------------------------------------------------------------
    def log_checkpoint(
        self,
        step: int,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        metrics: Mapping[str, Any] | None = None,
        aliases: Iterable[str] = (),
        extra: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        blocking: bool | None = None,
    ) -> CheckpointHandle:
        """Record a checkpoint of the given state at ``step``.

        Returns at once (the state is copied first); writing and uploading run
        in the background unless ``blocking=True``.  An error of an earlier
        background save is raised here.

        >>> run.log_checkpoint(500, model=model, optimizer=opt, metrics={"val/loss": 0.31})  # doctest: +SKIP
        """
        if self._finished:
            raise CheckpointWriteError("this run is finished; start a new one with ct.init()")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}")
        user_aliases = tuple(aliases)
        for a in user_aliases:
            Ref("x", alias=a)  # validates the characters
            if a in _RESERVED_ALIASES or a.startswith("step-"):
                raise ConfigError(f"alias {a!r} is managed by ckpt_track; pick another name")
        metric_values = _metrics(metrics)
        blocking = self.settings.blocking if blocking is None else blocking
        self._writer.raise_errors()
        captured = capture(step=step, epoch=epoch, model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, extra=extra)
        ref = self.ref.select(step=step)

        def lineage_now() -> dict[str, Any]:
            with self._lock:
                lineage = {**self._static_lineage, "parent": self._parent, "resumed_from": self._resumed_from}
                self._parent = str(ref)
            return lineage

        if blocking:  # written, and stored by the first tracker (or deferred), before this returns
            self._writer.flush()  # keep order: earlier background saves land first
            tensors = snapshot_tensors(captured.tensors, copy=False)
            done: Future[Pending] = Future()
            done.set_result(self._commit(step, epoch, metric_values, captured.tree, tensors, lineage_now(),
                                         user_aliases))
            handle = CheckpointHandle(step, ref, done)
            handle.wait()
            return handle

        def stage(buffers: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            return snapshot_tensors(captured.tensors, copy=True, buffers=buffers), lineage_now()

        def job(staged: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> Pending:
            tensors, lineage = staged
            wait_staged(tensors)
            return self._commit(step, epoch, metric_values, captured.tree, tensors, lineage, user_aliases)

        return CheckpointHandle(step, ref, self._writer.submit_staged(stage, job), self._writer)

    def _commit(self, step: int, epoch: int | None, metrics: dict[str, float], tree: dict[str, Any],
                tensors: dict[str, torch.Tensor], lineage: dict[str, Any], aliases: tuple[str, ...]) -> Pending:
        """Commit a checkpoint to the spool (that is the save) and queue its uploads."""
        name = self._spool.new_name(step)
        try:
            with self._spool.reusing():
                ckpt = write_checkpoint(self._spool.root, name, tensors, tree, step=step, epoch=epoch,
                                        metrics=metrics, lineage=lineage, shard_size=self.settings.shard_size,
                                        blobs=self.settings.incremental, reuse=self._spool.reusable())
        except (OSError, SafetensorError) as exc:  # the serializer has its own error type, e.g. on a full disk
            raise CheckpointWriteError(
                f"could not write checkpoint at step {step} to {self._spool.root} ({_free(self._spool.root)}): "
                f"{exc}; earlier checkpoints are intact. Free disk space or set [local] root to a larger disk"
            ) from exc
        try:
            item = self._spool.add(ckpt, aliases, [b.name for b, _ in self._targets])
        except OSError as exc:
            # committed, but its sidecar could not be written: upload it from memory; a crash
            # before then leaves a committed directory the next process queues for every backend
            log.warning("ckpt_track: could not write the upload record of %s (%s); uploading it anyway",
                        ckpt.path, exc)
            item = self._spool.add_unrecorded(ckpt, aliases, [b.name for b, _ in self._targets])
        self._uploader.kick()
        return item

    def _open_deferred(self) -> None:
        """Open the tracker runs that were unreachable at init (upload thread)."""
        for i, (backend, info) in enumerate(self._targets):
            if backend.name not in self._deferred:
                continue
            try:
                real = backend.open_run(self.spec)
            except BackendUnavailable as exc:
                self._deferred[backend.name] = exc
                continue
            except Exception as exc:  # refused (auth, configuration): reported, tried again next pass
                self._deferred[backend.name] = exc
                log.error("ckpt_track: could not open the run in %s: %s", backend.name, exc)
                continue
            with self._lock:
                self._targets[i] = (backend, real)
                del self._deferred[backend.name]
            log.warning("ckpt_track: %s is reachable again; run %s is now %s", backend.name, info.run_id, real.ref)
            if i == 0:
                self._spool.record_deferred({"project": self.project, "name": self.spec.name, "real_id": real.run_id})

    def _sweep(self) -> None:
        """Remove what a killed process (once per backend, for a resumed run) or a put that failed
        part way left half-created in the tracker."""
        for backend, info in self._targets:
            hook = getattr(backend, "sweep", None)
            due = backend.name in self._dirty or (info.resumed and backend.name not in self._swept)
            if hook is None or not due or backend.name in self._deferred:
                continue
            try:
                hook(info)
            except BackendUnavailable:
                continue
            except Exception as exc:
                log.warning("ckpt_track: could not clean up leftovers in %s: %s", backend.name, exc)
            self._swept.add(backend.name)
            self._dirty.discard(backend.name)

    def _drain(self, retry: bool = False) -> DrainResult:
        """Store every spooled checkpoint in every backend that is owed it (upload thread only);
        ``retry``: give the backends that refused one another try first."""
        if retry:
            self._spool.retry_refused()
        if self._deferred:
            self._open_deferred()
        self._sweep()
        targets = {b.name: (b, info) for b, info in self._targets}
        result = self._spool.drain(lambda name, ckpt, aliases: self._put(*targets[name], ckpt, aliases),
                                   down=set(self._deferred))
        for name, exc in self._deferred.items():
            result.deferred.append(f"{name}: {exc}")
        if result.deferred:
            log.warning("ckpt_track: %s; the checkpoint is kept on disk and will be uploaded when the tracker "
                        "is back (retried in the background and at finish())", "; ".join(result.deferred))
        for msg, exc in result.failures:
            log.error("ckpt_track: checkpoint not stored: %s", msg)
        return result

    def _put(self, backend: Backend, info: RunInfo, ckpt: LocalCheckpoint, user_aliases: tuple[str, ...]) -> Stored:
        """Store one checkpoint in one backend, deciding its aliases; then apply retention.

        Idempotent: a checkpoint the tracker already holds (same step and creation time: an
        earlier attempt whose answer was lost, or a process killed before it noted the upload)
        is recognised and completed, not stored twice.  ``latest`` goes to the highest step,
        whatever order uploads happen in."""
        monitor, mode = self.settings.monitor, self.settings.mode
        before = backend.list(info)
        done = _already_stored(before, ckpt)
        others = [s for s in before if s is not done]
        aliases = [f"step-{ckpt.step}", *user_aliases]
        if all(s.step <= ckpt.step for s in others):
            aliases.insert(0, "latest")
        new_value = ckpt.manifest.metrics.get(monitor) if monitor else None
        if new_value is not None:
            current = best_of(others, monitor, mode)
            if is_improvement(new_value, current.metrics.get(monitor) if current else None, mode):  # type: ignore[arg-type]
                aliases.append("best")
        if done is not None:
            stored = done
            backend.set_aliases(done, [a for a in aliases if a not in done.aliases])
        else:
            try:
                stored = backend.put(info, ckpt, aliases)
            except BackendUnavailable:
                self._dirty.add(backend.name)  # a half-made record may be left: swept when it is back
                raise
            except Exception:
                self._dirty.add(backend.name)
                # the tracker may have done the work and lost its answer: look before failing
                done = _already_stored(backend.list(info), ckpt)
                if done is None:
                    raise
                backend.set_aliases(done, aliases)
                stored = done
        if self.settings.retention.enabled():  # listing a remote run is not free: only when needed
            for old in retention_plan(backend.list(info), self.settings.retention, monitor, mode):
                backend.delete(old)
        return stored

    # -- resuming -----------------------------------------------------------------------
    def resume(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        ref: str | Ref | None = None,
        strict: bool = True,
        rng: bool = True,
    ) -> int:
        """Restore this run's latest checkpoint (or ``ref``, from any run or backend).

        Returns the step to continue from (the checkpoint's step + 1), or 0 when
        there is nothing to resume.  Later checkpoints record it as ``resumed_from``.
        """
        self._writer.flush()
        if ref is None:
            # the newest of what the tracker holds and what waits in the spool (committed on this
            # disk: not uploaded yet because the tracker is down or a killed process owed it, or
            # the newest one stored, kept for linking)
            spooled = self._spool.newest()
            found: Resolved | None = None
            if self._targets[0][0].name not in self._deferred:
                try:
                    found = resolve(self.ref, self.settings)  # a damaged newest version is refused
                except CheckpointNotFound:
                    found = None
                except BackendUnavailable:
                    if spooled is None:
                        raise
            if spooled is not None and (found is None or spooled.step > found.stored.step):
                return self._resume_spooled(spooled, model=model, optimizer=optimizer, scheduler=scheduler,
                                            scaler=scaler, strict=strict, rng=rng)
            if found is None:
                return 0
            ref = found.stored.ref
        found = resolve(ref, self.settings)
        restored = _restore_from(found, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                 strict=strict, rng=rng)
        self._record_resume(found)
        return restored.step + 1

    def _resume_spooled(self, ckpt: LocalCheckpoint, **targets: Any) -> int:
        from .backends.local import LocalBackend

        run = RunInfo("local", self.project, self.id, self.name, self.ref)
        stored = Stored(ref=self.ref.select(step=ckpt.step), run=run, version=0, step=ckpt.step,
                        metrics=dict(ckpt.manifest.metrics), created=ckpt.manifest.created,
                        native={"path": str(ckpt.path)})
        with self._spool.reusing():  # not dropped by the upload thread while it is read
            restored = _restore_from(Resolved(LocalBackend({"root": str(self._spool.root)}), run, stored), **targets)
        log.info("ckpt_track: resumed from step %d, spooled at %s (not uploaded yet)", ckpt.step, ckpt.path)
        with self._lock:
            self._resumed_from = str(stored.ref)
            self._parent = str(stored.ref)
        return restored.step + 1

    def mark_resumed(self, ref: str | Ref) -> Stored:
        """Record that this run continues from ``ref`` without loading it (for integrations
        that restore state their own way); returns the checkpoint it resolved to."""
        found = resolve(ref, self.settings)
        self._record_resume(found)
        return found.stored

    def _record_resume(self, found: Resolved) -> None:
        for backend, info in self._targets:
            if backend.name == found.backend.name:  # the tracker's own lineage graph, where it has one
                try:
                    backend.link_input(info, found.stored)
                except CkptTrackError as exc:
                    log.warning("ckpt_track: could not record the resume in %s: %s", backend.name, exc)
        with self._lock:
            self._resumed_from = str(found.stored.ref)
            self._parent = str(found.stored.ref)

    @property
    def uploads_pending(self) -> int:
        """Checkpoints committed to disk that some tracker does not hold yet (a tracker that is
        down, or one that refused them: see the log)."""
        return len(self._spool.items)

    def checkpoints(self) -> list[Stored]:
        """This run's committed checkpoints (primary backend), oldest first."""
        return self._primary_backend.list(self.info)

    # -- finishing ------------------------------------------------------------------------
    def wait(self) -> None:
        """Wait for every pending save and one upload pass (a tracker that is down is not waited
        for: its uploads stay queued); raise the first background write error."""
        self._writer.flush()
        if not self._finished:
            self._uploader.wait(self._uploader.kick())

    def finish(self) -> None:
        """Wait for pending saves (never drops one), then close the run."""
        global _active
        if self._finished:
            return
        self._finished = True
        atexit.unregister(self._atexit)
        if _active is self:
            _active = None
        try:
            try:
                self._writer.close()
            finally:
                # one last pass for everything owed (a tracker down meanwhile may be back, and one
                # that refused a checkpoint gets one more try); another only to sweep what failed
                # puts left behind in a tracker that is reachable now
                self._uploader.wait(self._uploader.kick(retry=True))
                # and a last sweep of every tracker that owes nothing now: an SDK's own retry of a
                # create whose answer was lost leaves a half-made record no put saw fail
                owing = {b for p in self._spool.items for b in p.backends}
                self._dirty |= {b.name for b, _ in self._targets} - owing - set(self._deferred)
                if self._dirty:
                    self._uploader.wait(self._uploader.kick())
                self._uploader.stop()
                pending = list(self._spool.items)
                described = self._spool.describe()
                for p in pending:  # nobody waits forever on a handle
                    p.settle(None)
                self._spool.close()
            if pending:
                refused = [p for p in pending if p.failed]
                why = "; ".join(f"step {p.ckpt.step} refused by {r}" for p in refused for r in p.reasons)
                if len(refused) < len(pending):
                    why = "; ".join(filter(None, [why, "a tracker is unreachable"]))
                raise CheckpointWriteError(
                    f"{len(pending)} checkpoint(s) could not be uploaded ({why}): {described}. "
                    "They are safe on disk; the next ct.init() of this run uploads them"
                )
        finally:
            for backend, info in self._targets:
                if backend.name in self._deferred:
                    continue
                try:
                    backend.finish_run(info)
                except CkptTrackError as exc:
                    log.warning("ckpt_track: could not close the run in %s: %s", backend.name, exc)

    def _finish_at_exit(self) -> None:
        try:
            self.finish()
        except CkptTrackError as exc:
            log.error("ckpt_track: %s", exc)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.finish()
        else:  # keep the training error primary; still wait for the saves
            try:
                self.finish()
            except CkptTrackError as exc:
                log.error("ckpt_track: %s", exc)


def init(
    project: str | None = None,
    *,
    name: str | None = None,
    run_id: str | None = None,
    backend: str | Sequence[str] | None = None,
    config: Any = None,
    monitor: str | None = _UNSET,
    mode: str | None = None,
    resume: ResumeMode = "auto",
    settings: Mapping[str, Any] | None = None,
) -> Run:
    """Start (or, with ``resume="auto"``, continue) a run and make it the active one.

    ``backend`` and the other keywords override environment variables and
    ``ckpt_track.toml``; ``settings`` takes any further keys in that file's shape.
    ``resume``: ``"auto"`` attaches to the run named by ``run_id``/``name`` (or
    ``$CKPT_TRACK_RUN_ID``/``$CKPT_TRACK_RUN_NAME``) when it exists, ``"never"``
    always starts a new run, ``"must"`` fails unless the run exists.

    >>> run = ct.init(project="resnet", config={"lr": 3e-4})  # doctest: +SKIP
    """
    global _active
    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"resume must be 'auto', 'never' or 'must', got {resume!r}")
    overrides: dict[str, Any] = dict(settings or {})
    overrides.update({k: v for k, v in {"project": project, "backend": backend, "mode": mode}.items() if v is not None})
    if monitor is not _UNSET and monitor is not None:
        overrides["monitor"] = monitor
    resolved = load_settings(overrides)
    if monitor is None:
        resolved = replace(resolved, monitor=None)
    spec = RunSpec(
        project=resolved.project,
        name=name or os.environ.get("CKPT_TRACK_RUN_NAME") or None,
        run_id=run_id or os.environ.get("CKPT_TRACK_RUN_ID") or None,
        config=_lineage.to_jsonable(config),
        resume=resume,
    )
    targets = []
    deferred: dict[str, BaseException] = {}
    for bname in resolved.backend:
        be = open_backend(bname, resolved)
        try:
            info = be.open_run(spec)
        except BackendUnavailable as exc:
            if resume == "must":
                raise
            # never block training on the tracker: start now, open the run when it is reachable
            info = _provisional(be.name, spec)
            deferred[be.name] = exc
            log.warning("ckpt_track: %s is unreachable (%s); training starts now with provisional run %s, "
                        "checkpoints are kept on disk and uploaded when it is back", bname,
                        str(exc).splitlines()[0][:300], info.run_id)
        targets.append((be, info))
    run = Run(resolved, spec, targets, deferred)
    if _active is not None and not _active._finished:
        log.warning("ckpt_track: a new run replaces the active run %s (call finish() on it)", _active.ref)
    _active = run
    return run


def _provisional(backend: str, spec: RunSpec) -> RunInfo:
    import uuid

    run_id = spec.run_id or f"deferred-{uuid.uuid4().hex[:12]}"
    return RunInfo(backend=backend, project=spec.project, run_id=run_id, name=spec.name or run_id,
                   ref=Ref(backend, run_id), resumed=False, native={"deferred": True})


def _already_stored(stored: Sequence[Stored], ckpt: LocalCheckpoint) -> Stored | None:
    """The version that is this very checkpoint (same step and creation time), if any."""
    m = ckpt.manifest
    return next((s for s in stored if s.step == m.step and m.created and s.created == m.created), None)


def _free(path: Path) -> str:
    import shutil

    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def log_checkpoint(step: int, **kwargs: Any) -> CheckpointHandle:
    """``log_checkpoint`` on the active run (the last one ``init`` started)."""
    if _active is None:
        raise ConfigError("no active run: call ckpt_track.init(...) first")
    return _active.log_checkpoint(step, **kwargs)


def restore(
    ref: str | Ref,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    strict: bool = True,
    rng: bool = True,
    settings: Settings | None = None,
) -> Restored:
    """Restore the checkpoint a reference selects into live objects, verified first.

    Accepts canonical references (``local://proj/run@best``) and any form a
    backend recognises (tracker UI URLs).  Nothing is loaded unless every file
    matches its manifest hash.

    >>> ct.restore("local://resnet/3k2j1x@best", model=model)  # doctest: +SKIP
    """
    return _restore_from(resolve(ref, settings), model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, strict=strict, rng=rng)


def _restore_from(found: Resolved, **targets: Any) -> Restored:
    return restore_from(found, **targets)  # all or nothing: see ckpt_track.restoring


def list_checkpoints(ref: str | Ref, settings: Settings | None = None) -> list[Stored]:
    """Every committed checkpoint of the run ``ref`` points into, oldest first."""
    return list_stored(ref, settings)
