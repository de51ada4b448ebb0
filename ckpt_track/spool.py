"""Checkpoints waiting for their trackers.

Every checkpoint is first committed to a spool directory on local disk: that is the save.
It is removed only once every configured backend has stored it.  Uploads drain behind
the training loop (:mod:`ckpt_track.uploader`), oldest step first; a backend that is
unreachable (:class:`BackendUnavailable`) keeps its uploads queued here, in order, and a
backend that refuses one (any other error) keeps it too: it is reported and retried by the
next process of the run.  A sidecar ``<dir>.pending.json`` lists the backends still owed
each checkpoint, so the queue survives a crash.

The newest checkpoint stored everywhere is kept (``kept``) until a newer one replaces it:
incremental saves hard-link its unchanged tensor files instead of writing them again.
``close()`` removes it.

One process at a time owns a run's spool (a file lock, released by the kernel when the
process dies).  The owner cleans up what a dead process left: half-written directories,
half-removed ones, stale markers.  After a clean ``close()`` nothing of the run remains.

A run whose tracker could not be reached at ``init`` has a provisional id; a small
``deferred-*.json`` record maps it to the run's name, so that a later process of the same
run (by name or real id) adopts its spooled checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, CheckpointNotFound, CheckpointWriteError, IntegrityError
from .format import TMP_PREFIX, LocalCheckpoint, read_manifest
from .records import Stored

__all__ = ["DrainResult", "Pending", "Spool"]

log = logging.getLogger("ckpt_track")
_SIDECAR = ".pending.json"
_KEPT = ".kept"
_DEFERRED = "deferred-"
_SIDECAR_TMP = re.compile(r"(.+)\.pending\.json\.[0-9a-f]{8}\.tmp")


class RunLock:
    """An exclusive, non-blocking lock on ``path`` (``flock``: the kernel drops it when the
    process dies).  The file is removed by its holder before release, so a process that opened
    it earlier checks after locking that the path still names the file it locked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # removed by its holder meanwhile: lock the new one
        return False

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)  # while still held: nobody can lock the old file now
        os.close(self._fd)
        self._fd = None


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(eq=False)
class Pending:
    ckpt: LocalCheckpoint
    aliases: tuple[str, ...]
    backends: list[str]  # still owed this checkpoint, in configuration order
    failed: list[str] = field(default_factory=list)  # refused it in this process: retried by the next one
    # resolved after the first upload attempt: the first Stored, None when deferred
    first: Future[Stored | None] = field(default_factory=Future, repr=False)
    reasons: list[str] = field(default_factory=list, repr=False)  # why a backend refused it, this process

    @property
    def sidecar(self) -> Path:
        return self.ckpt.path.with_name(self.ckpt.path.name + _SIDECAR)

    def save(self) -> None:
        _atomic_write(self.sidecar, {"aliases": list(self.aliases), "backends": self.backends, "failed": self.failed})

    def note(self) -> None:
        """Best-effort :meth:`save` while uploading: the sidecar only serves crash recovery, and
        one that is out of date costs an idempotent re-upload at most (a full disk must not stop
        the uploads)."""
        try:
            self.save()
        except OSError as exc:
            log.warning("ckpt_track: could not update %s (%s)", self.sidecar, exc)

    def settle(self, value: Stored | None = None, error: BaseException | None = None) -> None:
        if not self.first.done():
            if error is not None:
                self.first.set_exception(error)
            else:
                self.first.set_result(value)


@dataclass
class DrainResult:
    deferred: list[str] = field(default_factory=list)  # "backend: reason" for unreachable trackers
    failures: list[tuple[str, BaseException]] = field(default_factory=list)


def _read_sidecar(ckpt: LocalCheckpoint) -> Pending | None:
    """The queue item a checkpoint's sidecar records, or None when it has none or it is
    unreadable (a write cut short).  A backend that refused it in an earlier process is owed it
    again: it gets another try now."""
    sidecar = ckpt.path.with_name(ckpt.path.name + _SIDECAR)
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        item = Pending(ckpt, tuple(meta["aliases"]), list(meta["backends"]))
        item.backends += [b for b in meta.get("failed", []) if b not in item.backends]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return item


def _order(item: Pending) -> tuple[int, str]:
    return item.ckpt.step, item.ckpt.manifest.created


class Spool:
    """The queue of committed checkpoints not yet stored everywhere, for one run."""

    def __init__(self, root: Path, prefix: str, backends: Sequence[str] = (), *,
                 adopt: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.root = root
        self.prefix = prefix
        self._backends = list(backends)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(root / f".lock-{prefix}")
        self._adopted: list[RunLock] = []
        self.owner = self._lock.acquire()
        if not self.owner:  # another live process writes this run: touch nothing of its
            log.warning("ckpt_track: another process holds the spool of %s; its queued checkpoints are left to it",
                        prefix.rstrip("-"))
        self.kept: LocalCheckpoint | None = None
        # the writer thread adds items and links files from kept ones; the upload thread removes
        # items and drops kept ones: ``_mutex`` guards the lists, ``_reusing`` keeps a checkpoint
        # a save is linking from on disk until that save is written
        self._mutex = threading.RLock()
        self._reusing = threading.Lock()
        self._prefixes = [prefix]
        self._records: list[Path] = []
        if self.owner and adopt is not None:
            self._adopt(adopt)
        self.items: list[Pending] = self._recover() if self.owner else []

    # -- names ------------------------------------------------------------------------------
    def _is_mine(self, name: str) -> bool:
        return any(re.fullmatch(re.escape(p) + r"step\d+-[0-9a-f]{8}", name) for p in self._prefixes)

    def _is_my_tmp(self, name: str) -> bool:
        return any(re.fullmatch(re.escape(TMP_PREFIX + p) + r"step\d+-[0-9a-f]{8}-[0-9a-f]{8}", name)
                   for p in self._prefixes)

    def new_name(self, step: int) -> str:
        """A fresh directory name for a checkpoint of this run at ``step``."""
        return f"{self.prefix}step{step}-{uuid.uuid4().hex[:8]}"

    # -- deferred runs ------------------------------------------------------------------------
    def record_deferred(self, meta: dict[str, Any]) -> None:
        """Remember that this spool's run is provisional (its tracker was unreachable)."""
        path = self.root / f"{_DEFERRED}{self.prefix}json"
        _atomic_write(path, {**meta, "prefix": self.prefix})
        if path not in self._records:
            self._records.append(path)

    def _adopt(self, wanted: Callable[[dict[str, Any]], bool]) -> None:
        for path in sorted(self.root.glob(f"{_DEFERRED}*json")):
            try:
                meta = json.loads(path.read_text())
                prefix = str(meta["prefix"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if prefix == self.prefix or not wanted(meta):
                continue
            other = RunLock(self.root / f".lock-{prefix}")
            if not other.acquire():  # the deferred run's own process (or another adopter) is alive
                continue
            self._adopted.append(other)  # held until close(): no second process adopts it too
            self._prefixes.append(prefix)
            self._records.append(path)
            log.info("ckpt_track: adopting the checkpoints spooled while run %s was deferred", prefix.rstrip("-"))

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self) -> list[Pending]:
        """Rebuild the queue from the disk (the owner, once): what a dead process left half-done
        is removed, each committed checkpoint is queued for the backends still owed it, and of
        those stored everywhere only the newest is kept (the source of unchanged files)."""
        found: list[Pending] = []
        kept: list[LocalCheckpoint] = []
        for path in sorted(self.root.iterdir()):
            if self._remove_leftover(path) or not self._is_mine(path.name) or not path.is_dir():
                continue
            recovered = self._recover_dir(path)
            if isinstance(recovered, Pending):
                found.append(recovered)
            elif recovered is not None:
                kept.append(recovered)
        kept.sort(key=lambda c: (c.step, c.manifest.created))
        for old in kept[:-1]:
            self._drop(old)
        self.kept = kept[-1] if kept else None
        return sorted(found, key=_order)

    def _remove_leftover(self, path: Path) -> bool:
        """Remove ``path`` when it is something of this run a dead process left half-done: a
        half-written or half-removed directory, a marker or sidecar whose checkpoint is gone, a
        record or sidecar write cut short.  True when it was one."""
        name = path.name
        if self._is_my_tmp(name):  # half-written or half-removed by a dead process
            shutil.rmtree(path, ignore_errors=True)
            return True
        for suffix in (_KEPT, _SIDECAR):  # the marker of a checkpoint that is gone
            if name.endswith(suffix) and self._is_mine(name[: -len(suffix)]) and not path.with_name(
                    name[: -len(suffix)]).is_dir():
                path.unlink(missing_ok=True)
                return True
        deferred_tmp = name.startswith(_DEFERRED) and name.endswith(".tmp") and any(
            name.startswith(f"{_DEFERRED}{p}json.") for p in self._prefixes)  # a deferred record's write cut short
        sidecar_tmp = (m := _SIDECAR_TMP.fullmatch(name)) is not None and self._is_mine(m.group(1))
        if deferred_tmp or sidecar_tmp:
            path.unlink(missing_ok=True)
            return True
        return False

    def _recover_dir(self, path: Path) -> Pending | LocalCheckpoint | None:
        """One of this run's checkpoint directories: the queue item it still is, the checkpoint
        when it is stored everywhere, or None when it was never committed (then removed)."""
        try:
            ckpt = LocalCheckpoint(path, read_manifest(path))
        except (CheckpointNotFound, IntegrityError, OSError) as exc:
            # never committed (killed before the manifest) or damaged: nothing to upload
            log.warning("ckpt_track: removing an uncommitted spool directory %s (%s)", path, exc)
            self._drop_path(path)
            return None
        kept = path.with_name(path.name + _KEPT)
        item = _read_sidecar(ckpt)
        if item is None:
            if kept.exists():
                return ckpt
            # committed, but the process died before the sidecar: owed to every backend
            item = Pending(ckpt, (), list(self._backends))
        if item.backends:
            item.backends = [b for b in item.backends if b in self._backends] or list(self._backends)
            item.save()
            return item
        # stored everywhere; the process died before it was marked kept
        kept.touch()
        item.sidecar.unlink(missing_ok=True)
        return ckpt

    # -- queue --------------------------------------------------------------------------------
    def add(self, ckpt: LocalCheckpoint, aliases: Sequence[str], backends: Sequence[str]) -> Pending:
        item = Pending(ckpt, tuple(aliases), list(backends))
        item.save()
        return self._queue(item)

    def _queue(self, item: Pending) -> Pending:
        with self._mutex:
            self.items.append(item)
            self.items.sort(key=_order)  # uploads keep step order, recovered ones included
        return item

    def add_unrecorded(self, ckpt: LocalCheckpoint, aliases: Sequence[str], backends: Sequence[str]) -> Pending:
        """Queue a committed checkpoint whose sidecar could not be written (a full disk)."""
        return self._queue(Pending(ckpt, tuple(aliases), list(backends)))

    def retry_refused(self) -> None:
        """Give the backends that refused a checkpoint in this process another try (call it on
        the upload thread, between passes)."""
        with self._mutex:
            for item in self.items:
                if item.failed:
                    item.backends += [b for b in item.failed if b not in item.backends]
                    item.failed.clear()
                    item.reasons.clear()

    def drain(self, put: Callable[[str, LocalCheckpoint, tuple[str, ...]], Stored],
              down: set[str] | None = None) -> DrainResult:
        """Upload what is owed, lowest step first; an unreachable backend is skipped for the rest
        of the pass so versions stay in step order.  A refusal keeps the checkpoint (retried by
        the next process)."""
        result = DrainResult()
        down = set() if down is None else down
        with self._mutex:
            queue = list(self.items)
        for item in queue:
            try:
                self._drain_one(item, put, down, result)
            except Exception as exc:  # noqa: BLE001 - bookkeeping on a full disk, say: never stop the queue
                log.error("ckpt_track: uploading %s failed: %s", item.ckpt.path, exc)
                item.settle(error=CheckpointWriteError(f"checkpoint at step {item.ckpt.step}: {exc}"))
        return result

    def _drain_one(self, item: Pending, put: Callable[[str, LocalCheckpoint, tuple[str, ...]], Stored],
                   down: set[str], result: DrainResult) -> None:
        first: Stored | None = None
        errors: list[tuple[str, BaseException]] = []
        for name in list(item.backends):
            if name in down:
                continue
            try:
                stored = put(name, item.ckpt, item.aliases)
            except BackendUnavailable as exc:
                down.add(name)
                result.deferred.append(f"{name}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a refusal: kept, reported, retried by the next process
                with self._mutex:
                    item.backends.remove(name)
                    item.failed.append(name)
                msg = f"{name}: {exc} (checkpoint kept at {item.ckpt.path}; the next run of it retries)"
                result.failures.append((msg, exc))
                errors.append((msg, exc))
                item.reasons.append(f"{name}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")
                item.note()
                continue
            with self._mutex:
                item.backends.remove(name)
            first = first or stored
            item.note()
        if first is not None:
            item.settle(first)
        elif errors:
            error = CheckpointWriteError(f"checkpoint at step {item.ckpt.step} was not stored: {errors[0][0]}")
            error.__cause__ = errors[0][1]
            item.settle(error=error)
        else:
            item.settle(None)  # deferred: it waits on disk
        if not item.backends and not item.failed:
            self._keep(item)

    def _keep(self, item: Pending) -> None:
        """Keep a stored checkpoint as the source of unchanged files for the next save (if it is
        the newest), and drop the one it replaces once no save is linking from it."""
        ckpt = item.ckpt
        try:  # the marker first: a crash never re-uploads it (without it: an idempotent re-upload)
            ckpt.path.with_name(ckpt.path.name + _KEPT).touch()
        except OSError as exc:
            log.warning("ckpt_track: could not mark %s as stored (%s)", ckpt.path, exc)
        item.sidecar.unlink(missing_ok=True)
        with self._mutex:
            self.items.remove(item)
            newest = self.kept is None or (ckpt.step, ckpt.manifest.created) >= (self.kept.step,
                                                                                 self.kept.manifest.created)
            drop, self.kept = (self.kept, ckpt) if newest else (ckpt, self.kept)  # an older one: not kept
        if drop is not None and drop.path != self.kept.path:
            with self._reusing:
                self._drop(drop)

    def _drop(self, ckpt: LocalCheckpoint) -> None:
        self._drop_path(ckpt.path)

    def _drop_path(self, path: Path) -> None:
        # renamed first, so a removal cut short leaves a tmp directory (removed by the next owner)
        # rather than a committed-looking one
        trash = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except OSError:
            trash = path
        path.with_name(path.name + _KEPT).unlink(missing_ok=True)
        path.with_name(path.name + _SIDECAR).unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)

    def newest(self) -> LocalCheckpoint | None:
        """The highest-step checkpoint committed here (owed, refused, or kept)."""
        with self._mutex:
            candidates = [p.ckpt for p in self.items] + ([self.kept] if self.kept is not None else [])
        return max(candidates, key=lambda c: (c.step, c.manifest.created), default=None)

    def reusable(self) -> list[LocalCheckpoint]:
        """Committed checkpoints on disk whose files a new checkpoint may hard-link, newest first
        (call it inside :meth:`reusing`, so none of them is dropped meanwhile)."""
        with self._mutex:
            out = [p.ckpt for p in reversed(self.items)]
            return out + ([self.kept] if self.kept is not None else [])

    def reusing(self) -> threading.Lock:
        """Held by a save while it links files from :meth:`reusable` checkpoints."""
        return self._reusing

    def close(self) -> None:
        """Drop the kept checkpoint and this run's records (the run is over; every backend has it).
        Checkpoints still owed stay, with the lock released, for the next process."""
        if self.kept is not None:
            self._drop(self.kept)
            self.kept = None
        done = not self.items
        if done:
            for rec in self._records:
                rec.unlink(missing_ok=True)
        for other in self._adopted:
            other.release(remove=done)
        self._adopted.clear()
        if self.owner:
            self._lock.release(remove=done)
            self.owner = False

    def describe(self) -> str:
        """What is still owed, for an error message."""
        return ", ".join(f"step {p.ckpt.step} for {'/'.join(p.backends + p.failed)} at {p.ckpt.path}"
                         for p in self.items)
