"""One local checkpoint store, used by the ``local`` backend and by the offline modes of
trackers that cannot read back what their SDK wrote (W&B, Comet).

Layout under ``root`` (``checkpoints`` is configurable; W&B offline keeps versions directly in
the run directory)::

    <root>/<project>/<run_id>/run.json                    name, created, config, last_version
    <root>/<project>/<run_id>/aliases.json                {"latest": 3, "best": 2}
    <root>/<project>/<run_id>/<checkpoints>/v000003/      one committed checkpoint (format v1)
    <root>/<project>/<run_id>/<checkpoints>/.incoming/    copies in progress (<pid>-<uuid>)

Version numbers are allocated and aliases moved under a per-run lock, so several processes
can write one store; a version is committed by renaming a complete copy into place.  The
decisions (next version number, which files a version shares with the newest ones) come
from :mod:`ckpt_track.plan`; every file operation goes through :mod:`ckpt_track.storage`.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFound, CheckpointWriteError, CkptTrackError, IntegrityError
from ..format import TMP_PREFIX, FileEntry, LocalCheckpoint, Manifest, free_space, is_blob, now_iso, read_manifest
from ..plan import NAME, check_segment, describe_runs, newest_named, next_version
from ..storage import LOCAL, LocalStorage

__all__ = ["DirStore", "RunDir", "Version", "new_run_id"]

VERSION_DIR = re.compile(r"^v(\d{6,})$")


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _incoming_name() -> str:
    """A version's name while it is copied in: its writer's process id first (see ``sweep``)."""
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@dataclass(frozen=True)
class Version:
    """One committed version of a run in the store."""

    number: int
    path: Path
    manifest: Manifest
    aliases: tuple[str, ...]


class RunDir:
    """One run's directory: its ``run.json``, alias table and version directories."""

    def __init__(self, path: Path, *, checkpoints: str = "checkpoints", storage: LocalStorage = LOCAL,
                 fix: str = "free disk space") -> None:
        self.path = Path(path)
        self.versions_dir = self.path / checkpoints if checkpoints else self.path
        self.storage = storage
        self.fix = fix  # what a full disk's error message tells the user to do

    # -- tables ---------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return self.storage.read_json(self.path / "run.json")

    def exists(self) -> bool:
        return (self.path / "run.json").is_file()

    def lock(self) -> Any:
        return self.storage.lock(self.path)

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        self.storage.write_json(self.path / "run.json", dict(meta), fix=self.fix)

    def update_meta(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Apply ``change`` to ``run.json`` under the run's lock; returns the new table."""
        with self.lock():
            meta = change(self.meta())
            self.write_meta(meta)
            return meta

    def aliases(self) -> dict[str, int]:
        table = self.storage.read_json(self.path / "aliases.json")
        try:
            return {str(k): int(v) for k, v in table.items()}
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"{self.path / 'aliases.json'} is damaged: {exc}") from exc

    def _write_aliases(self, table: Mapping[str, int]) -> None:
        self.storage.write_json(self.path / "aliases.json", dict(table), fix=self.fix)

    def point(self, aliases: Sequence[str], version: int) -> None:
        """Move each alias to ``version``."""
        with self.lock():
            self._write_aliases({**self.aliases(), **dict.fromkeys(aliases, version)})

    # -- versions -------------------------------------------------------------------------
    def numbers(self) -> list[int]:
        d = self.versions_dir
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for e in d.iterdir() if (m := VERSION_DIR.match(e.name)))

    def version_path(self, number: int) -> Path:
        return self.versions_dir / f"v{number:06d}"

    def high_water(self, meta: Mapping[str, Any]) -> int:
        """The highest version number ever given out (``next_version`` is an older spelling)."""
        return max(int(meta.get("last_version", 0)), int(meta.get("next_version", 1)) - 1)

    def held_blobs(self, newest: int = 2) -> dict[str, tuple[Path, FileEntry]]:
        """Content-addressed files of the newest versions (what a new version may link)."""
        held: dict[str, tuple[Path, FileEntry]] = {}
        for number in self.numbers()[-newest:]:
            vdir = self.version_path(number)
            try:
                manifest = read_manifest(vdir)
            except (CheckpointNotFound, IntegrityError):
                continue
            for fname, entry in manifest.files.items():
                path = vdir / fname
                if is_blob(fname) and path.is_file() and path.stat().st_size == entry.size:
                    held[fname] = (path, entry)
        return held

    def add(self, ckpt: LocalCheckpoint, aliases: Sequence[str] = (),
            on_commit: Callable[[int, Path], None] | None = None) -> tuple[Version, int]:
        """Store ``ckpt`` as the next version; returns it and the bytes copied (files the newest
        versions already hold are hard-linked from them).  ``on_commit(number, path)`` runs
        under the lock once the version is in place; if it raises, the version is removed."""
        incoming: LocalCheckpoint | None = None
        try:
            incoming, copied = self._copy_in(ckpt)
            with self.lock():
                meta = self.meta()
                number = next_version(self.numbers(), self.high_water(meta))
                final = self.version_path(number)
                self.storage.rename(incoming.path, final)
                incoming = None
                try:
                    if on_commit is not None:
                        on_commit(number, final)
                except BaseException:
                    self.storage.remove_now(final)
                    raise
                self.write_meta({**meta, "last_version": number})
                table = {**self.aliases(), **dict.fromkeys(aliases, number)}
                self._write_aliases(table)
        except CkptTrackError:
            raise  # a tracker's own error from on_commit (BackendUnavailable is an OSError too)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not store checkpoint step {ckpt.step} under {self.path} ({free_space(self.path)}): "
                f"{exc}; {self.fix}") from exc
        finally:
            if incoming is not None:  # a copy that never became a version
                self.storage.remove_now(incoming.path)
        names = tuple(sorted(a for a, v in table.items() if v == number))
        return Version(number, final, ckpt.manifest, names), copied

    def _copy_in(self, ckpt: LocalCheckpoint) -> tuple[LocalCheckpoint, int]:
        # content-addressed tensor files the store already holds are hard-linked from there:
        # the bytes are stored once, and deleting a version keeps every other version's links
        held = self.held_blobs()
        files = ckpt.manifest.files
        sources = {f: held[f][0] for f, e in files.items() if is_blob(f) and f in held and held[f][1] == e}
        incoming = self.versions_dir / ".incoming"
        try:
            copy = self.storage.copy_in(ckpt, incoming, _incoming_name(), sources)
        except FileNotFoundError:
            if not sources:
                raise
            # another writer deleted the version holding a file meanwhile: take every file from ckpt
            return self.storage.copy_in(ckpt, incoming, _incoming_name()), sum(e.size for e in files.values())
        return copy, sum(e.size for f, e in files.items() if f not in sources)

    def remove(self, number: int) -> None:
        """Remove a version and the aliases pointing at it."""
        with self.lock():
            self._write_aliases({a: v for a, v in self.aliases().items() if v != number})
            trash = self.storage.trash(self.version_path(number))  # no longer a version from here on
        if trash is not None:  # the slow part outside the lock: other writers go on
            self.storage.remove_now(trash)

    def sweep(self) -> None:
        """Remove what killed writers left: copies in ``.incoming`` of processes that are gone
        (named after their writer's pid) and half-removed versions (``.deleting-*``)."""
        incoming = self.versions_dir / ".incoming"
        if incoming.is_dir():
            for entry in incoming.iterdir():
                pid = entry.name.removeprefix(TMP_PREFIX).split("-", 1)[0]  # also copy_in's temp dirs
                if not pid.isdigit() or not _alive(int(pid)):
                    self.storage.remove_now(entry)
        if self.versions_dir.is_dir():
            for entry in self.versions_dir.glob(".deleting-*"):
                self.storage.remove_now(entry)

    def read(self) -> tuple[list[Version], dict[int, tuple[tuple[str, ...], str]]]:
        """Every committed version, and the damaged ones (number -> (aliases, what is wrong))."""
        table = self.aliases()
        out: list[Version] = []
        damaged: dict[int, tuple[tuple[str, ...], str]] = {}
        for number in self.numbers():
            names = tuple(sorted(a for a, v in table.items() if v == number))
            try:
                manifest = read_manifest(self.version_path(number))
            except CheckpointNotFound:
                continue  # being deleted, or never committed
            except IntegrityError as exc:
                warnings.warn(f"skipping damaged checkpoint: {exc}", stacklevel=3)
                damaged[number] = (names, str(exc))
                continue
            out.append(Version(number, self.version_path(number), manifest, names))
        return out, damaged


class DirStore:
    """Projects of runs under one root directory."""

    def __init__(self, root: Path, *, checkpoints: str = "checkpoints", storage: LocalStorage = LOCAL,
                 fix: str = "free disk space") -> None:
        self.root = Path(root)
        self.checkpoints = checkpoints
        self.storage = storage
        self.fix = fix

    def project_dir(self, project: str) -> Path:
        return self.root / check_segment(project, "project name")

    def run(self, project: str, run_id: str) -> RunDir:
        return RunDir(self.project_dir(project) / run_id, checkpoints=self.checkpoints, storage=self.storage,
                      fix=self.fix)

    def lock_project(self, project: str) -> Any:
        return self.storage.lock(self.project_dir(project))

    def projects(self) -> list[str]:
        """The projects under the root that hold at least one run, by name (hidden entries
        such as the spool, and names the store would refuse, are not projects)."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir()
                      if NAME.match(d.name) and not d.name.startswith(".") and d.is_dir()
                      and any((r / "run.json").is_file() for r in d.iterdir() if r.is_dir()))

    def runs(self, project: str) -> list[tuple[str, dict[str, Any]]]:
        """``(run_id, run.json)`` of every run of ``project``, oldest first."""
        pdir = self.project_dir(project)
        if not pdir.is_dir():
            return []
        found = [(d.name, self.storage.read_json(d / "run.json")) for d in pdir.iterdir()
                 if d.is_dir() and (d / "run.json").is_file()]
        return sorted(found, key=lambda r: str(r[1].get("created", "")))

    def named(self, project: str, name: str) -> str | None:
        """The newest run of ``project`` called ``name``."""
        return newest_named(self.runs(project), name)

    def find(self, project: str, wanted: str) -> str | None:
        """A run by id, else by name."""
        if NAME.match(wanted) and self.run(project, wanted).exists():
            return wanted
        return self.named(project, wanted)

    def create(self, project: str, run_id: str | None, meta: Mapping[str, Any]) -> RunDir:
        """A new run directory with ``run.json`` (``run_id`` None: a fresh random id).  Call
        under :meth:`lock_project`."""
        if run_id is None:
            run_id = new_run_id()
            while (self.project_dir(project) / run_id).exists():
                run_id = new_run_id()
        rdir = self.run(project, check_segment(run_id, "run id"))
        rdir.versions_dir.mkdir(parents=True, exist_ok=True)
        if "name" in meta and not meta["name"]:
            meta = {**meta, "name": run_id}  # an unnamed run is called by its id, written once
        rdir.write_meta({"run_id": run_id, "project": project, "created": now_iso(), **meta})
        return rdir

    def describe(self, project: str, limit: int = 10) -> str:
        """The newest runs of a project, for not-found messages."""
        return describe_runs(self.runs(project), limit)


