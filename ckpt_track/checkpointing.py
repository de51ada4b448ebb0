"""One ``log_checkpoint`` call: its arguments checked before anything is copied, the lineage it
records, the handle it returns at once, and the commit to the spool that is the save.

Kept apart from :class:`ckpt_track.run.Run` so that what a save promises (checked inputs, the
spool commit, an error message that says what is still safe) reads in one place.
"""

from __future__ import annotations

import logging
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .errors import CheckpointWriteError, CkptTrackError, ConfigError, SerializationError, StepOrderWarning
from .format import write_checkpoint
from .records import Stored
from .refs import Ref
from .spool import Pending, Spool
from .writer import Writer

__all__ = ["CheckpointHandle", "LineageChain", "check_step", "commit", "metric_values", "user_aliases",
           "warn_step_order"]

log = logging.getLogger("ckpt_track")
RESERVED_ALIASES = frozenset({"latest", "best"})


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
        item = self._committed(timeout)
        try:
            return item.first.result(timeout)
        except CheckpointWriteError:
            raise
        except CkptTrackError as exc:
            raise CheckpointWriteError(f"checkpoint at step {self.step} was not saved: {exc}") from exc

    def committed(self, timeout: float | None = None) -> None:
        """Block until the checkpoint is committed to this machine's disk (crash-safe: if the
        process dies now, the next one of the run uploads it), without waiting for a tracker.
        Under torch.distributed, every rank's part is written and rank 0 has committed.  Raises
        :class:`CheckpointWriteError` as :meth:`wait` does."""
        self._committed(timeout)

    def _committed(self, timeout: float | None) -> Pending:
        try:
            try:
                return self._future.result(timeout)
            except BaseException as exc:
                if self._writer is not None:
                    self._writer.acknowledge(exc)  # seen here: not raised again by the next call
                raise
        except CheckpointWriteError:
            raise
        except CkptTrackError as exc:
            raise CheckpointWriteError(f"checkpoint at step {self.step} was not saved: {exc}") from exc

    @property
    def stored(self) -> Stored | None:
        return self.wait()

    def __repr__(self) -> str:
        return f"<CheckpointHandle {self.ref} {'done' if self.done() else 'pending'}>"


def check_step(step: Any) -> int:
    """``step`` as given, refused unless it is a non-negative int (a bool is not a step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative int, got {step!r}")
    return step


def user_aliases(aliases: Iterable[str]) -> tuple[str, ...]:
    """The user's aliases, checked before the state is copied: characters a reference can
    hold, and none of the names ckpt_track moves itself."""
    out = tuple(aliases)
    for a in out:
        Ref("x", alias=a)  # validates the characters
        if a in RESERVED_ALIASES or a.startswith("step-"):
            raise ConfigError(f"alias {a!r} is managed by ckpt_track; pick another name")
    return out


def metric_values(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as floats (a one-element tensor is read out), refused before any copy is made."""
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


class LineageChain:
    """Which checkpoint the next one continues from (``parent``) and what the run resumed from.

    A save takes its lineage when its state is captured (:meth:`next`), so background saves
    chain in the order they were logged."""

    def __init__(self, static: Mapping[str, Any], parent: str | None = None) -> None:
        self._static = dict(static)
        self._parent = parent
        self._resumed_from: str | None = None
        self._lock = threading.Lock()

    def next(self, ref: Ref) -> dict[str, Any]:
        """The lineage of the checkpoint ``ref``; it becomes the parent of the next one."""
        with self._lock:
            lineage = {**self._static, "parent": self._parent, "resumed_from": self._resumed_from}
            self._parent = str(ref)
        return lineage

    def resumed(self, ref: Ref) -> None:
        """The run continues from ``ref``: later checkpoints record it, the next one as its parent."""
        with self._lock:
            self._resumed_from = str(ref)
            self._parent = str(ref)


def commit(spool: Spool, backends: list[str], step: int, epoch: int | None, metrics: dict[str, float],
           tree: dict[str, Any], tensors: dict[str, torch.Tensor], lineage: dict[str, Any],
           aliases: tuple[str, ...], *, shard_size: int, incremental: bool,
           before_commit: Callable[[], None] | None = None) -> Pending:
    """Commit a checkpoint to the spool (that is the save) and queue it for ``backends``;
    ``before_commit`` may still refuse it once its files are written (see ``write_checkpoint``)."""
    name = spool.new_name(step)
    try:
        with spool.reusing():
            ckpt = write_checkpoint(spool.root, name, tensors, tree, step=step, epoch=epoch, metrics=metrics,
                                    lineage=lineage, shard_size=shard_size, blobs=incremental,
                                    reuse=spool.reusable(), before_commit=before_commit)
    except (OSError, SafetensorError) as exc:  # the serializer has its own error type, e.g. on a full disk
        raise CheckpointWriteError(
            f"could not write checkpoint at step {step} to {spool.root} ({free_space(spool.root)}): "
            f"{exc}; earlier checkpoints are intact. Free disk space or set [local] root to a larger disk"
        ) from exc
    try:
        return spool.add(ckpt, aliases, backends)
    except OSError as exc:
        # committed, but its sidecar could not be written: upload it from memory; a crash
        # before then leaves a committed directory the next process queues for every backend
        log.warning("ckpt_track: could not write the upload record of %s (%s); uploading it anyway",
                    ckpt.path, exc)
        return spool.add_unrecorded(ckpt, aliases, backends)


def free_space(path: Path) -> str:
    """The free space at ``path``, for a write error's message."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def warn_step_order(run: Ref, step: int, last: int | None) -> int:
    """Warn (:class:`StepOrderWarning`) when ``step`` repeats or goes below the highest step
    the run already holds; returns the new highest step.  Both are stored, as asked:
    ``@step=N`` selects the newest version at step N and ``latest`` the highest step."""
    if last is not None and step <= last:
        what = "was already logged" if step == last else f"is below step {last}, logged earlier"
        warnings.warn(StepOrderWarning(
            f"{run}: step {step} {what}; both are kept as separate versions: {run}@step={step} selects "
            f"the newest at that step and @latest the highest step (pass the global step, e.g. the "
            f"value run.resume() returned plus the steps since, to keep steps increasing)"), stacklevel=3)
    return step if last is None else max(step, last)
