"""The Run: ``init`` / ``resume`` / ``log_checkpoint`` / ``finish``; owns backends and writer.

The pieces a run is made of, each in its own module:

- :mod:`ckpt_track.checkpointing`: one ``log_checkpoint`` call (checked inputs, lineage, the
  handle, the commit to the spool that is the save);
- :mod:`ckpt_track.writer`: the background thread that writes a save behind the training loop;
- :mod:`ckpt_track.spool`: the committed checkpoints on local disk not yet in every tracker;
- :mod:`ckpt_track.delivery` and :mod:`ckpt_track.uploader`: the upload thread that stores them.

This module holds what the training thread calls, and the order ``finish`` shuts them down in.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from . import provenance
from .checkpointing import (
    CheckpointHandle,
    LineageChain,
    check_step,
    commit,
    metric_values,
    user_aliases,
    warn_step_order,
)
from .config import Settings, load_settings
from .delivery import Delivery, Spooled, open_targets
from .errors import (
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
)
from .overlap import StepGate, settle_all
from .policy import select
from .protocol import Backend
from .records import ResumeMode, RunInfo, RunSpec, Stored
from .refs import Ref
from .resolve import Resolved, list_stored, resolve
from .restoring import restore_from
from .spool import DrainResult, Pending, Spool
from .state import Restored, capture
from .uploader import Uploader
from .writer import Writer, snapshot_tensors

if TYPE_CHECKING:
    from typing_extensions import Self


__all__ = ["CheckpointHandle", "Run", "init", "list_checkpoints", "log_checkpoint", "restore"]

log = logging.getLogger("ckpt_track")


class _Unset:
    """The default of a keyword whose ``None`` means something (``init(monitor=None)``)."""

    def __repr__(self) -> str:
        return "<from settings>"


_UNSET: Any = _Unset()
_active: Any = None  # the Run (or DistributedRun) init started last


class Run:
    """A training run recording checkpoints to one or more backends.  Create with :func:`init`."""

    def __init__(self, settings: Settings, spec: RunSpec, targets: Sequence[tuple[Backend, RunInfo]],
                 deferred: Mapping[str, BaseException] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self._writer = Writer(settings.max_in_flight)
        self._gate = StepGate()  # holds the optimizer's step while an overlapped snapshot copies
        self._delivery = Delivery(settings, spec, targets, deferred)
        self._finished = False
        static = {"run": str(self.ref), "config_hash": provenance.config_hash(spec.config),
                  "git": provenance.git_info(), **provenance.environment()}
        parent, self._last_step = self._last_stored()
        self._chain = LineageChain(static, parent=parent)
        weak = weakref.ref(self)
        self._atexit = lambda: (r := weak()) is not None and r._finish_at_exit()
        atexit.register(self._atexit)
        # a bound method of the run: the upload thread keeps the run alive until it is finished
        self._uploader = Uploader(self._drain)
        self._uploader.kick()  # uploads a previous process owed this run go first; clean up what it left

    def _last_stored(self) -> tuple[str | None, int | None]:
        """The newest checkpoint of a resumed run (the parent of this process's first one) and
        the highest step the run holds, or ``(None, None)``."""
        try:
            existing = self._primary_backend.list(self.info) if self.info.resumed else []
        except BackendUnavailable:
            existing = []
        if not existing:
            return None, None
        return str(select(existing, self.ref).ref), max(s.step for s in existing)

    @property
    def _targets(self) -> list[tuple[Backend, RunInfo]]:
        """``(backend, run)`` per configured backend, primary first (a deferred one provisional)."""
        return self._delivery.targets

    @property
    def _spool(self) -> Spool:
        return self._delivery.spool

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
        overlap: bool | None = None,
    ) -> CheckpointHandle:
        """Record a checkpoint of the given state at ``step``.

        Returns at once; writing and uploading run in the background unless
        ``blocking=True``.  What the optimizer owns (parameters, its state) is copied in the
        background while the next forward and backward run, and ``optimizer.step()`` waits
        for that copy; everything else is copied before this returns (``overlap=False``, or
        ``overlap = false`` in the settings: everything is).  An error of an earlier
        background save is raised here.

        >>> run.log_checkpoint(500, model=model, optimizer=opt, metrics={"val/loss": 0.31})  # doctest: +SKIP
        """
        if self._finished:
            raise CheckpointWriteError("this run is finished; start a new one with ct.init()")
        step = check_step(step)
        chosen = user_aliases(aliases)  # every argument is checked before any state is copied
        values = metric_values(metrics)
        highest = warn_step_order(self.ref, step, self._last_step)  # kept once the save is under way
        blocking = self.settings.blocking if blocking is None else blocking
        overlap = self.settings.overlap if overlap is None else bool(overlap)
        self._writer.raise_errors()
        captured = capture(step=step, epoch=epoch, model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, extra=extra)
        ref = self.ref.select(step=step)
        save = partial(self._commit, step, epoch, values, captured.tree, aliases=chosen)  # (tensors, lineage)

        if blocking:  # written, and stored by the first tracker (or deferred), before this returns
            self._writer.flush()  # keep order: earlier background saves land first
            tensors = snapshot_tensors(captured.tensors, copy=False)  # device copies complete on return
            done: Future[Pending] = Future()
            done.set_result(save(tensors, self._chain.next(ref)))
            self._last_step = highest  # committed to the spool: that is the save
            handle = CheckpointHandle(step, ref, done)
            handle.wait()
            return handle

        future = self._gate.submit(self._writer, step, captured.tensors, optimizer if overlap else None,
                                   lineage=partial(self._chain.next, ref), save=save)
        self._last_step = highest
        return CheckpointHandle(step, ref, future, self._writer)

    def _commit(self, step: int, epoch: int | None, metrics: dict[str, float], tree: dict[str, Any],
                tensors: dict[str, torch.Tensor], lineage: dict[str, Any], *, aliases: tuple[str, ...],
                before_commit: Callable[[], None] | None = None) -> Pending:
        """Commit a checkpoint to the spool (that is the save) and queue its uploads."""
        item = commit(self._spool, [b.name for b, _ in self._targets], step, epoch, metrics, tree, tensors,
                      lineage, aliases, shard_size=self.settings.shard_size, incremental=self.settings.incremental,
                      before_commit=before_commit)
        self._uploader.kick()
        return item

    def _drain(self, retry: bool = False) -> DrainResult:
        """One upload pass (upload thread only): see :meth:`Delivery.drain`."""
        return self._delivery.drain(retry)

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
        settle_all("after log_checkpoint returned and before a resume")  # any run's copies of these tensors
        source = self._resume_source(ref)
        if source is None:
            return 0
        if isinstance(source, Spooled):
            with self._spool.reusing():  # not dropped by the upload thread while it is read
                restored = restore_from(source, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                        strict=strict, rng=rng)
        else:
            restored = restore_from(source, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                    strict=strict, rng=rng)
        self._resumed(source)
        return restored.step + 1

    def _resume_source(self, ref: str | Ref | None) -> Resolved | Spooled | None:
        """What ``resume`` restores: the exact version ``ref`` resolves to, or (no ``ref``) the
        newest of what the tracker holds and what waits in the spool; None when nothing."""
        self._writer.flush()
        if ref is None:
            # the newest of what the tracker holds and what waits in the spool (committed on this
            # disk: not uploaded yet because the tracker is down or a killed process owed it, or
            # the newest one stored, kept for linking)
            spooled = self._spool.newest()
            found: Resolved | None = None
            if self._primary_backend.name not in self._delivery.deferred:
                try:
                    found = resolve(self.ref, self.settings)  # a damaged newest version is refused
                except CheckpointNotFound:
                    found = None
                except BackendUnavailable:
                    if spooled is None:
                        raise
            if spooled is not None and (found is None or spooled.step > found.stored.step):
                stored = Stored(ref=self.ref.select(step=spooled.step), run=self.info, version=0, step=spooled.step,
                                metrics=dict(spooled.manifest.metrics), created=spooled.manifest.created)
                return Spooled(stored, spooled, self.settings)
            if found is None:
                return None
            ref = found.stored.ref
        return resolve(ref, self.settings)

    def _resumed(self, source: Resolved | Spooled) -> None:
        """Record that this run continues from ``source`` (lineage; the tracker's own graph)."""
        if isinstance(source, Spooled):
            log.info("ckpt_track: resumed from step %d, spooled at %s (not uploaded yet)", source.ckpt.step,
                     source.ckpt.path)
            self._chain.resumed(source.stored.ref)
        else:
            self._record_resume(source)

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
        self._chain.resumed(found.stored.ref)

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
            pending, described = self._drain_and_close()
            if pending:
                raise CheckpointWriteError(_owed(pending, described))
        finally:
            self._delivery.finish_runs()

    def _drain_and_close(self) -> tuple[list[Pending], str]:
        """Write every pending save, upload what is owed, stop the threads and close the spool;
        returns the checkpoints still owed (kept on disk for the next process) and their
        description.  A background write error is raised after the uploads are done."""
        try:
            try:
                self._writer.close()
            finally:
                self._gate.close()
        finally:
            # one last pass for everything owed (a tracker down meanwhile may be back, and one
            # that refused a checkpoint gets one more try); another only to sweep what failed
            # puts (or an SDK's own retry of a create) left behind in a tracker reachable now
            self._uploader.wait(self._uploader.kick(retry=True))
            if self._delivery.sweep_all_settled():
                self._uploader.wait(self._uploader.kick())
            self._uploader.stop()
            pending = list(self._spool.items)
            described = self._spool.describe()
            for p in pending:  # nobody waits forever on a handle
                p.settle(None)
            self._spool.close()
        return pending, described

    def _finish_at_exit(self) -> None:
        try:
            self.finish()
        except CkptTrackError as exc:
            log.error("ckpt_track: %s", exc)

    def __enter__(self) -> Self:
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
    resolved = _init_settings(settings, project=project, backend=backend, mode=mode, monitor=monitor)
    spec = RunSpec(
        project=resolved.project,
        name=name or os.environ.get("CKPT_TRACK_RUN_NAME") or None,
        run_id=run_id or os.environ.get("CKPT_TRACK_RUN_ID") or None,
        config=provenance.to_jsonable(config),
        resume=resume,
    )
    def make_run() -> Run:
        targets, deferred = open_targets(resolved, spec)
        return Run(resolved, spec, targets, deferred)

    if resolved.distributed != "off" and _in_process_group():
        from .distributed import init_collective

        run = init_collective(resolved, make_run)
    else:
        run = make_run()
    if _active is not None and not _active._finished:
        log.warning("ckpt_track: a new run replaces the active run %s (call finish() on it)", _active.ref)
    _active = run
    return run


def _in_process_group() -> bool:
    """True inside an initialized torch.distributed process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _init_settings(settings: Mapping[str, Any] | None, *, project: str | None, backend: str | Sequence[str] | None,
                   mode: str | None, monitor: str | None) -> Settings:
    """The settings ``init``'s keywords override (a keyword left None is not given; an explicit
    ``monitor=None`` switches the monitored metric off)."""
    overrides: dict[str, Any] = dict(settings or {})
    overrides.update({k: v for k, v in {"project": project, "backend": backend, "mode": mode}.items() if v is not None})
    if monitor is not _UNSET and monitor is not None:
        overrides["monitor"] = monitor
    resolved = load_settings(overrides)
    return replace(resolved, monitor=None) if monitor is None else resolved


def _owed(pending: Sequence[Pending], described: str) -> str:
    """Why ``finish`` could not upload everything, and that nothing is lost."""
    refused = [p for p in pending if p.failed]
    why = "; ".join(f"step {p.ckpt.step} refused by {r}" for p in refused for r in p.reasons)
    if len(refused) < len(pending):
        why = "; ".join(filter(None, [why, "a tracker is unreachable"]))
    return (f"{len(pending)} checkpoint(s) could not be uploaded ({why}): {described}. "
            "They are safe on disk; the next ct.init() of this run uploads them")


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
    found = resolve(ref, settings)
    settle_all("after log_checkpoint returned and before a restore")  # a background copy of a run's snapshot may still read the tensors about to be written
    return restore_from(found, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, strict=strict, rng=rng)  # all or nothing: see ckpt_track.restoring


def list_checkpoints(ref: str | Ref, settings: Settings | None = None) -> list[Stored]:
    """Every committed checkpoint of the run ``ref`` points into, oldest first."""
    return list_stored(ref, settings)

