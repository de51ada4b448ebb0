"""Checkpoints waiting for their trackers.

Every checkpoint is first committed to a spool directory on local disk; it is
removed only once every configured backend has stored it.  A backend that is
unreachable (:class:`BackendUnavailable`) does not fail the training loop: its
uploads stay queued here, in order, and are retried before the next checkpoint,
at ``finish()``, and by the next run that attaches to the same run id.  A
sidecar ``<dir>.pending.json`` lists the backends still owed each checkpoint,
so the queue survives a crash.

The newest checkpoint stored everywhere is kept (``kept``) until a newer one
replaces it: incremental saves hard-link its unchanged tensor files instead of
writing them again.  ``close()`` removes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Stored
from .errors import BackendUnavailable, CheckpointNotFound, IntegrityError
from .format import TMP_PREFIX, LocalCheckpoint, read_manifest

__all__ = ["Pending", "Spool", "DrainResult"]

log = logging.getLogger("ckpt_track")
_SIDECAR = ".pending.json"
_KEPT = ".kept"
_STALE_TMP_S = 6 * 3600


@dataclass
class Pending:
    ckpt: LocalCheckpoint
    aliases: tuple[str, ...]
    backends: list[str]  # still owed this checkpoint, in configuration order
    failed: list[str] = field(default_factory=list)  # gave a permanent error: kept, not retried

    @property
    def sidecar(self) -> Path:
        return self.ckpt.path.with_name(self.ckpt.path.name + _SIDECAR)

    def save(self) -> None:
        tmp = self.sidecar.with_suffix(".tmp")
        tmp.write_text(json.dumps({"aliases": list(self.aliases), "backends": self.backends, "failed": self.failed}))
        os.replace(tmp, self.sidecar)


@dataclass
class DrainResult:
    stored: dict[int, Stored] = field(default_factory=dict)  # id(Pending) -> first Stored of it
    deferred: list[str] = field(default_factory=list)  # "backend: reason" for unreachable trackers
    failures: list[tuple[str, BaseException]] = field(default_factory=list)


class Spool:
    """The queue of committed checkpoints not yet stored everywhere, for one run."""

    def __init__(self, root: Path, prefix: str, backends: Sequence[str] = ()) -> None:
        self.root = root
        self.prefix = prefix
        self._backends = list(backends)
        # exactly this run's names: another run's id may start with this one's
        self._name_re = re.compile(re.escape(prefix) + r"step\d+-[0-9a-f]{8}")
        self._tmp_re = re.compile(re.escape(TMP_PREFIX + prefix) + r"step\d+-[0-9a-f]{8}-[0-9a-f]{8}")
        self.kept: LocalCheckpoint | None = None
        self.items: list[Pending] = self._recover()

    def _recover(self) -> list[Pending]:
        if not self.root.is_dir():
            return []
        # half-written directories of a process killed mid-save were never visible (the rename
        # publishes); remove the stale ones: nothing in them written for hours
        for tmp in self.root.iterdir():
            if self._tmp_re.fullmatch(tmp.name) and tmp.is_dir():
                try:
                    newest = max([tmp.stat().st_mtime, *(f.stat().st_mtime for f in tmp.iterdir())])
                except OSError:
                    continue
                if time.time() - newest > _STALE_TMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
        found = []
        # committed directories without a pending sidecar: kept ones (a ``.kept`` marker) of a
        # process that ended without close(), the newest reused; and ones a process was killed
        # with between commit and sidecar, owed to every backend
        kept = []
        for path in sorted(self.root.iterdir()):
            if not self._name_re.fullmatch(path.name) or not path.is_dir() \
                    or path.with_name(path.name + _SIDECAR).exists():
                continue
            try:
                ckpt = LocalCheckpoint(path, read_manifest(path))
            except (CheckpointNotFound, IntegrityError, OSError):
                continue  # not a committed checkpoint: leave it alone
            marker = path.with_name(path.name + _KEPT)
            if marker.exists():
                kept.append(ckpt)
            elif self._backends:  # the sidecar makes the loop below queue it
                Pending(ckpt, (), list(self._backends)).save()
        kept.sort(key=lambda c: c.manifest.created)
        for old in kept[:-1]:
            self._drop(old)
        self.kept = kept[-1] if kept else None
        for sidecar in sorted(self.root.glob(f"*{_SIDECAR}")):
            path = sidecar.with_name(sidecar.name[: -len(_SIDECAR)])
            if not self._name_re.fullmatch(path.name):
                continue  # another run's
            try:
                meta = json.loads(sidecar.read_text())
                item = Pending(LocalCheckpoint(path, read_manifest(path)), tuple(meta["aliases"]),
                               list(meta["backends"]), list(meta.get("failed", [])))
            except (OSError, ValueError, KeyError, CheckpointNotFound, IntegrityError) as exc:
                log.warning("ckpt_track: ignoring unreadable spooled checkpoint %s: %s", path, exc)
                continue
            if item.backends:
                found.append(item)
        return sorted(found, key=lambda p: p.ckpt.manifest.created)

    def new_name(self, step: int) -> str:
        """A fresh directory name for a checkpoint of this run at ``step``."""
        return f"{self.prefix}step{step}-{uuid.uuid4().hex[:8]}"

    def add(self, ckpt: LocalCheckpoint, aliases: Sequence[str], backends: Sequence[str]) -> Pending:
        item = Pending(ckpt, tuple(aliases), list(backends))
        item.save()
        self.items.append(item)
        return item

    def drain(self, put: Callable[[str, LocalCheckpoint, tuple[str, ...]], Stored]) -> DrainResult:
        """Upload what is owed, oldest first; an unreachable backend is skipped for the rest
        of the pass so versions stay in step order."""
        result = DrainResult()
        down: set[str] = set()
        for item in list(self.items):
            for name in list(item.backends):
                if name in down:
                    continue
                try:
                    stored = put(name, item.ckpt, item.aliases)
                except BackendUnavailable as exc:
                    down.add(name)
                    result.deferred.append(f"{name}: {exc}")
                    continue
                except Exception as exc:
                    item.backends.remove(name)
                    item.failed.append(name)
                    result.failures.append((f"{name}: {exc} (checkpoint kept at {item.ckpt.path})", exc))
                    item.save()
                    continue
                item.backends.remove(name)
                result.stored.setdefault(id(item), stored)
                item.save()
            if not item.backends:
                self.items.remove(item)
                if not item.failed:
                    self._keep(item.ckpt)  # the marker first: a crash in between never re-uploads it
                    item.sidecar.unlink(missing_ok=True)
        return result

    def _keep(self, ckpt: LocalCheckpoint) -> None:
        """Keep ``ckpt`` as the source of unchanged files for the next save; drop the one before."""
        ckpt.path.with_name(ckpt.path.name + _KEPT).touch()
        old, self.kept = self.kept, ckpt
        if old is not None and old.path != ckpt.path:
            self._drop(old)

    @staticmethod
    def _drop(ckpt: LocalCheckpoint) -> None:
        # renamed first, so a removal cut short leaves a stale tmp directory (cleaned up later)
        # rather than a committed-looking one
        trash = ckpt.path.with_name(f"{TMP_PREFIX}{ckpt.path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(ckpt.path, trash)
        except OSError:
            trash = ckpt.path
        ckpt.path.with_name(ckpt.path.name + _KEPT).unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)

    def reusable(self) -> list[LocalCheckpoint]:
        """Committed checkpoints on disk whose files a new checkpoint may hard-link, newest first."""
        out = [p.ckpt for p in reversed(self.items)]
        return out + ([self.kept] if self.kept is not None else [])

    def close(self) -> None:
        """Drop the kept checkpoint (the run is over; every backend has it)."""
        if self.kept is not None:
            self._drop(self.kept)
            self.kept = None

    def describe(self) -> str:
        return ", ".join(f"step {p.ckpt.step} for {'/'.join(p.backends)} at {p.ckpt.path}" for p in self.items)
