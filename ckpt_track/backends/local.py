"""The embedded ``local`` backend: a store directory that needs no server.

Layout (``root`` defaults to ``./ckpt_runs``)::

    <root>/<project>/<run_id>/run.json             name, created, training config
    <root>/<project>/<run_id>/aliases.json         {"latest": 3, "best": 2, "step-500": 1}
    <root>/<project>/<run_id>/checkpoints/v000003/ one committed checkpoint (format v1)

Version numbers are allocated and aliases moved under a per-run file lock, so
several processes can write to one store without clobbering each other.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock, Timeout

from ..errors import (
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from ..format import FileEntry, LocalCheckpoint, Manifest, copy_checkpoint, is_blob, read_manifest
from ..refs import Ref
from ..records import RunInfo, RunSpec, Stored

__all__ = ["LocalBackend", "DEFAULT_ROOT"]

DEFAULT_ROOT = "ckpt_runs"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_LOCK_TIMEOUT_S = 120.0
_NAME_MAX = 255  # bytes of one file name (ext4, APFS, NTFS)
_ROOT_MAX = 3400  # bytes: room under PATH_MAX (4096) for <project>/<run>/checkpoints/v000001/<file>


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path} ({_free(path.parent)}): {exc}; free disk space "
                                   "or set [local] root to a larger disk") from exc


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _root(value: Any) -> Path:
    """The store directory from the ``root`` option (or ``?root=``), refused up front when no file
    system could hold it, so that a mistyped value is a ConfigError and never ENAMETOOLONG."""
    text = str(value)
    why = "holds a NUL character" if "\0" in text else ""
    path = Path(text.replace("\0", "")).expanduser().absolute()
    if not why and any(len(os.fsencode(part)) > _NAME_MAX for part in path.parts):
        why = f"has a name longer than {_NAME_MAX} bytes"
    elif not why and len(os.fsencode(str(path))) > _ROOT_MAX:
        why = f"is longer than {_ROOT_MAX} bytes"
    if why:
        shown = text if len(text) <= 80 else f"{text[:80]}..."
        raise ConfigError(f"local backend: root {shown!r} {why}; set [local] root (or ?root=) to a directory")
    return path


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


class LocalBackend:
    """Checkpoints in a directory tree; the default backend."""

    name: ClassVar[str] = "local"
    options: ClassVar[frozenset[str]] = frozenset({"root"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete", "concurrent_writers", "choose_run_id", "dedup"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - self.options
        if unknown:
            raise ConfigError(f"local backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        self.root = _root(options.get("root") or DEFAULT_ROOT)
        self._damaged: dict[str, dict[int, tuple[tuple[str, ...], str]]] = {}

    # -- paths and locks ------------------------------------------------------------
    def _project_dir(self, project: str) -> Path:
        if not _NAME.match(project):
            raise ConfigError(f"project name {project!r} may only hold letters, digits, '_', '.', '-'")
        return self.root / project

    def _run_dir(self, run: RunInfo) -> Path:
        return self.root / run.project / run.run_id

    @contextmanager
    def _lock(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory / ".lock"), timeout=_LOCK_TIMEOUT_S)
        try:
            with lock:
                yield
        except Timeout as exc:
            raise BackendUnavailable(
                f"could not lock {directory} within {_LOCK_TIMEOUT_S:.0f} s; another process holds "
                f"{directory / '.lock'} (delete it only if no ckpt_track process is running)"
            ) from exc

    def _info(self, project: str, run_id: str, resumed: bool) -> RunInfo:
        meta = self._read_run_json(self.root / project / run_id)
        return RunInfo(
            backend=self.name, project=project, run_id=run_id, name=str(meta.get("name", run_id)),
            ref=Ref(self.name, f"{project}/{run_id}"), resumed=resumed,
            native={"path": str(self.root / project / run_id)},
        )

    @staticmethod
    def _read_run_json(run_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((run_dir / "run.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise IntegrityError(f"{run_dir / 'run.json'} is damaged: {exc}") from exc

    def _runs(self, project: str) -> list[tuple[str, dict[str, Any]]]:
        pdir = self._project_dir(project)
        if not pdir.is_dir():
            return []
        runs = []
        for d in pdir.iterdir():
            if d.is_dir() and (d / "run.json").is_file():
                runs.append((d.name, self._read_run_json(d)))
        return sorted(runs, key=lambda r: str(r[1].get("created", "")))

    # -- runs -------------------------------------------------------------------------
    def open_run(self, spec: RunSpec) -> RunInfo:
        pdir = self._project_dir(spec.project)
        with self._lock(pdir):
            if spec.run_id is not None:
                if not _NAME.match(spec.run_id):
                    raise ConfigError(f"run id {spec.run_id!r} may only hold letters, digits, '_', '.', '-'")
                if (pdir / spec.run_id / "run.json").is_file():
                    if spec.resume == "never":
                        raise ConfigError(
                            f"run {spec.run_id!r} already exists in project {spec.project!r} and resume='never'; "
                            "pass resume='auto' to continue it, or another run_id"
                        )
                    return self._info(spec.project, spec.run_id, resumed=True)
                if spec.resume == "must":
                    raise CheckpointNotFound(self._no_run_message(spec.project, spec.run_id))
                return self._create(spec, spec.run_id)
            if spec.name is not None and spec.resume != "never":
                matches = [rid for rid, meta in self._runs(spec.project) if meta.get("name") == spec.name]
                if matches:
                    return self._info(spec.project, matches[-1], resumed=True)
            if spec.resume == "must":
                if spec.name is None:
                    raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
                raise CheckpointNotFound(self._no_run_message(spec.project, spec.name))
            run_id = _new_run_id()
            while (pdir / run_id).exists():
                run_id = _new_run_id()
            return self._create(spec, run_id)

    def _create(self, spec: RunSpec, run_id: str) -> RunInfo:
        run_dir = self.root / spec.project / run_id
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        _atomic_json(run_dir / "run.json", {
            "run_id": run_id, "name": spec.name or run_id, "project": spec.project,
            "created": _now(), "config": dict(spec.config),
        })
        return self._info(spec.project, run_id, resumed=False)

    def _no_run_message(self, project: str, wanted: str) -> str:
        runs = self._runs(project)
        known = ", ".join(f"{rid} ({meta.get('name', rid)})" for rid, meta in runs[-10:]) or "none"
        return f"no run {wanted!r} in project {project!r} under {self.root}; runs there: {known}"

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) != 2:
            raise InvalidRef(f"{ref}: a local reference names a project and a run: local://<project>/<run>")
        project, wanted = segs
        if (self._project_dir(project) / wanted / "run.json").is_file():
            return self._info(project, wanted, resumed=True)
        named = [rid for rid, meta in self._runs(project) if meta.get("name") == wanted]
        if named:
            return self._info(project, named[-1], resumed=True)
        raise CheckpointNotFound(self._no_run_message(project, wanted))

    def list_runs(self, project: str) -> list[RunInfo]:
        return [self._info(project, rid, resumed=True) for rid, _ in self._runs(project)]

    # -- checkpoints --------------------------------------------------------------------
    def _aliases(self, run_dir: Path) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads((run_dir / "aliases.json").read_text()).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError) as exc:
            raise IntegrityError(f"{run_dir / 'aliases.json'} is damaged: {exc}") from exc

    def _stored(self, run: RunInfo, version: int, manifest: Manifest, aliases: Mapping[str, int]) -> Stored:
        return Stored(
            ref=run.ref.select(version=version), run=run, version=version, step=manifest.step,
            epoch=manifest.epoch, aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            metrics=dict(manifest.metrics), size=manifest.size, created=manifest.created,
            lineage=dict(manifest.lineage),
            native={"path": str(self._run_dir(run) / "checkpoints" / f"v{version:06d}")},
        )

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        run_dir = self._run_dir(run)
        cdir = run_dir / "checkpoints"
        # content-addressed tensor files the store already holds are hard-linked from there:
        # the bytes are stored once, and deleting a version keeps every other version's links
        held = self._held_blobs(cdir)
        sources = {f: held[f][0] for f, e in ckpt.manifest.files.items() if is_blob(f) and f in held and held[f][1] == e}
        uploaded = sum(e.size for f, e in ckpt.manifest.files.items() if f not in sources)
        # copy (hard-link when possible) outside the lock; only numbering happens under it
        incoming: LocalCheckpoint | None = None
        try:
            try:
                incoming = copy_checkpoint(ckpt, cdir / ".incoming", _incoming_name(), sources=sources)
            except FileNotFoundError:
                if not sources:
                    raise
                # another writer deleted the version holding a file meanwhile: take every file from ckpt
                uploaded = sum(e.size for e in ckpt.manifest.files.values())
                incoming = copy_checkpoint(ckpt, cdir / ".incoming", _incoming_name())
            with self._lock(run_dir):
                # the high-water mark keeps a deleted newest version's number from being reused
                last = self._read_run_json(run_dir).get("last_version", 0)
                version = max([*self._versions(cdir), int(last)], default=0) + 1
                final = cdir / f"v{version:06d}"
                os.rename(incoming.path, final)
                incoming = None
                _atomic_json(run_dir / "run.json", {**self._read_run_json(run_dir), "last_version": version})
                table = self._aliases(run_dir)
                table.update({a: version for a in aliases})
                _atomic_json(run_dir / "aliases.json", table)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not store checkpoint step {ckpt.step} under {self.root} ({_free(self.root)}): {exc}; "
                "free disk space or set [local] root to a larger disk"
            ) from exc
        finally:
            if incoming is not None:  # a copy that never became a version
                shutil.rmtree(incoming.path, ignore_errors=True)
        return replace(self._stored(run, version, ckpt.manifest, table), uploaded=uploaded)

    def sweep(self, run: RunInfo) -> None:
        """Remove what killed writers of ``run`` left: copies still in ``.incoming`` (named after
        their writer's process id: only those of processes that are gone) and half-removed
        versions (``.deleting-*``)."""
        cdir = self._run_dir(run) / "checkpoints"
        incoming = cdir / ".incoming"
        if incoming.is_dir():
            for entry in incoming.iterdir():
                pid = entry.name.removeprefix(".tmp-").split("-", 1)[0]  # also copy_checkpoint's temp dirs
                if not pid.isdigit() or not _alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
        if cdir.is_dir():
            for entry in cdir.glob(".deleting-*"):
                shutil.rmtree(entry, ignore_errors=True)

    def _held_blobs(self, cdir: Path, newest: int = 2) -> dict[str, tuple[Path, FileEntry]]:
        """Content-addressed files of the newest stored versions (what a new version may link)."""
        held: dict[str, tuple[Path, FileEntry]] = {}
        for version in sorted(self._versions(cdir))[-newest:]:
            vdir = cdir / f"v{version:06d}"
            try:
                manifest = read_manifest(vdir)
            except (CheckpointNotFound, IntegrityError):
                continue
            for fname, entry in manifest.files.items():
                path = vdir / fname
                if is_blob(fname) and path.is_file() and path.stat().st_size == entry.size:
                    held[fname] = (path, entry)
        return held

    @staticmethod
    def _versions(cdir: Path) -> list[int]:
        if not cdir.is_dir():
            return []
        return [int(m.group(1)) for d in cdir.iterdir() if (m := _VERSION_DIR.match(d.name))]

    def list(self, run: RunInfo) -> list[Stored]:
        run_dir = self._run_dir(run)
        cdir = run_dir / "checkpoints"
        aliases = self._aliases(run_dir)
        out = []
        damaged: dict[int, tuple[tuple[str, ...], str]] = {}
        for version in sorted(self._versions(cdir)):
            try:
                manifest = read_manifest(cdir / f"v{version:06d}")
            except CheckpointNotFound:
                continue  # being deleted, or never committed
            except IntegrityError as exc:
                warnings.warn(f"skipping damaged checkpoint: {exc}", stacklevel=2)
                damaged[version] = (tuple(sorted(a for a, v in aliases.items() if v == version)), str(exc))
                continue
            out.append(self._stored(run, version, manifest, aliases))
        self._damaged[str(run_dir)] = damaged
        return out

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """Versions of ``run`` whose manifest is damaged (left out of :meth:`list`): version ->
        (the aliases pointing at it, what is wrong)."""
        key = str(self._run_dir(run))
        if key not in self._damaged:
            self.list(run)
        return dict(self._damaged[key])

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        path = Path(stored.native["path"])
        return LocalCheckpoint(path, read_manifest(path))  # already on local disk: no copy

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        run_dir = self._run_dir(stored.run)
        with self._lock(run_dir):
            table = self._aliases(run_dir)
            table.update({a: stored.version for a in aliases})
            _atomic_json(run_dir / "aliases.json", table)

    def delete(self, stored: Stored) -> None:
        run_dir = self._run_dir(stored.run)
        path = Path(stored.native["path"])
        with self._lock(run_dir):
            table = {a: v for a, v in self._aliases(run_dir).items() if v != stored.version}
            _atomic_json(run_dir / "aliases.json", table)
            if not path.exists():
                return
            # rename first, so a half-deleted directory is never taken for a checkpoint
            trash = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        run_dir = self._run_dir(run)
        with self._lock(run_dir):
            meta = self._read_run_json(run_dir)
            inputs = list(meta.get("inputs", []))
            if str(source.ref) not in inputs:
                inputs.append(str(source.ref))
            _atomic_json(run_dir / "run.json", {**meta, "inputs": inputs})

    def finish_run(self, run: RunInfo) -> None:
        return None  # nothing to close: every write is already durable

    # -- references ---------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return None  # the canonical local://<project>/<run> form is parsed by the core

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return ("local://<project>/<run id or name>[@selector][?root=/path/to/store]",)
