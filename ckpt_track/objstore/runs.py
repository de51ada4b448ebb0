"""One run in an object store: ``run.json``, its alias table and its version manifests; a
version is committed by its manifest, written create-only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
    IntegrityError,
)
from ..format import MANIFEST, LocalCheckpoint, Manifest, is_blob, now_iso, parse_manifest, read_manifest
from ..format.manifest import MAX_MANIFEST_BYTES
from ..plan import NAME, check_segment, describe_runs, newest_named, next_version
from .fsio import _translate, storage_errors
from .store import _RESERVED, VERSION_FILE, ObjectStore

__all__ = ["ObjectProjects", "ObjectRun", "Version"]

_CLAIM_TRIES = 64  # version numbers tried when other writers take them meanwhile


@dataclass(frozen=True)
class Version:
    """One committed version of a run in the object store (``path``: its manifest's URL)."""

    number: int
    path: str
    manifest: Manifest
    aliases: tuple[str, ...]


class ObjectRun:
    """One run in an object store: ``run.json``, its alias table and its version manifests."""

    def __init__(self, store: ObjectStore, path: str) -> None:
        self.store = store
        self.path = path
        self.versions_dir = f"{path}/checkpoints"

    def meta(self) -> dict[str, Any]:
        return self.store.read_json(f"{self.path}/run.json", "run.json")

    def exists(self) -> bool:
        return bool(self.meta())

    def write_meta(self, meta: Mapping[str, Any], *, create: bool = False) -> None:
        self.store.write_json(f"{self.path}/run.json", dict(meta), "run.json", create=create)

    def update_meta(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        meta = change(self.meta())
        self.write_meta(meta)
        return meta

    def aliases(self) -> dict[str, int]:
        table = self.store.read_json(f"{self.path}/aliases.json", "aliases.json")
        try:
            return {str(k): int(v) for k, v in table.items()}
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"{self.store.show(self.path)}/aliases.json is damaged: {exc}") from exc

    def point(self, aliases: Sequence[str], version: int) -> None:
        if aliases:
            table = {**self.aliases(), **dict.fromkeys(aliases, version)}
            self.store.write_json(f"{self.path}/aliases.json", table, "aliases.json")

    def numbers(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.store.listdir(self.versions_dir) if (m := VERSION_FILE.match(n)))

    def version_path(self, number: int) -> str:
        return f"{self.versions_dir}/v{number:06d}.json"

    def add(self, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> tuple[Version, int]:
        """Upload ``ckpt``'s files as objects (those the prefix holds are not sent again), then
        commit its manifest create-only as the next free version; returns it and the bytes sent."""
        where = f"checkpoint step {ckpt.step}"
        files = {f: e for f, e in ckpt.manifest.files.items() if f != MANIFEST}
        local = {self.store.object_path(e): ckpt.path / f for f, e in files.items()}
        try:
            sent, found = self.store.upload(local, where)
            raw = (ckpt.path / MANIFEST).read_bytes()
        except OSError as exc:
            if isinstance(exc, CkptTrackError):
                raise
            raise CheckpointWriteError(f"could not read {where} at {ckpt.path}: {exc}") from exc
        number = self._claim(raw, where)
        # a delete that read the manifests before this commit may have removed a shared object
        # since the upload found it there: send what is missing again, now that the manifest
        # protects it (objects sent just now are not shared yet, and gc spares young objects)
        if found:
            sent += self.store.upload({p: local[p] for p in found}, where)[0]
        meta = self.meta()
        if int(meta.get("last_version", 0)) < number:
            self.write_meta({**meta, "last_version": number})
        self.point(aliases, number)
        table = self.aliases()
        names = tuple(sorted(a for a, v in table.items() if v == number))
        return Version(number, self.store.show(self.version_path(number)), ckpt.manifest, names), sent

    def _claim(self, raw: bytes, where: str) -> int:
        number = next_version(self.numbers(), int(self.meta().get("last_version", 0)))
        for _ in range(_CLAIM_TRIES):
            try:
                self.store.write(self.version_path(number), raw, f"the manifest of {where}", create=True)
                return number
            except FileExistsError:
                number += 1  # another writer took it: the next one
        raise CheckpointWriteError(f"{where}: no free version number after {_CLAIM_TRIES} tries under "
                                   f"{self.store.show(self.versions_dir)}; too many concurrent writers")

    def read(self) -> tuple[list[Version], dict[int, tuple[tuple[str, ...], str]]]:
        """Every committed version, and the damaged ones (number -> (aliases, what is wrong))."""
        table = self.aliases()
        numbers = self.numbers()
        paths = [self.version_path(n) for n in numbers]
        with storage_errors("reading manifests", self.store.show(self.versions_dir)):
            raws = self.store.fs.cat(paths, on_error="return") if paths else {}
        out: list[Version] = []
        damaged: dict[int, tuple[tuple[str, ...], str]] = {}
        for number, path in zip(numbers, paths, strict=True):
            names = tuple(sorted(a for a, v in table.items() if v == number))
            raw = raws.get(path)
            if isinstance(raw, FileNotFoundError):
                continue  # deleted meanwhile
            try:
                if isinstance(raw, BaseException):
                    raise _translate(raw, "reading a manifest", self.store.show(path)) if not isinstance(
                        raw, CkptTrackError) else raw
                if raw is None or len(raw) > MAX_MANIFEST_BYTES:
                    raise IntegrityError(f"{self.store.show(path)} is larger than {MAX_MANIFEST_BYTES} bytes")
                manifest = parse_manifest(bytes(raw), self.store.show(path))
            except IntegrityError as exc:
                damaged[number] = (names, str(exc))
                continue
            out.append(Version(number, self.store.show(path), manifest, names))
        return out, damaged

    def remove(self, number: int) -> None:
        """Remove a version (its manifest first: from then on it is not a version), the aliases
        pointing at it, and its objects that no other version under the prefix references."""
        path = self.version_path(number)
        raw = self.store.cat(path, MAX_MANIFEST_BYTES, "a manifest")
        table = self.aliases()
        if any(v == number for v in table.values()):
            self.store.write_json(f"{self.path}/aliases.json", {a: v for a, v in table.items() if v != number},
                                  "aliases.json")
        self.store.release(path, raw)

    def fetch_into(self, number: int, into: Path, names: Sequence[str] | None = None) -> None:
        """Download version ``number``'s manifest and own files into ``into`` (``names``: only those
        content-addressed files, by the manifest already there)."""
        if names is None:
            path = self.version_path(number)
            raw = self.store.cat(path, MAX_MANIFEST_BYTES, "a manifest")
            if raw is None:
                raise CheckpointNotFound(f"{self.store.show(path)} was deleted meanwhile; list the run again")
            files = parse_manifest(raw, self.store.show(path)).files
            into.mkdir(parents=True, exist_ok=True)
            (into / MANIFEST).write_bytes(raw)
            names = [f for f in files if f != MANIFEST and not is_blob(f)]
        else:
            files = read_manifest(into).files
        self.store.download({self.store.object_path(files[f]): into / f for f in names},
                            f"version {number}", sum(files[f].size for f in names))

    def sweep(self) -> None:
        return None  # nothing half-written is ever listed; unreferenced objects are left to gc


class ObjectProjects:
    """Projects of runs in one object store (what the ``local`` backend uses for a URL root)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.url = store.url

    def check(self) -> None:
        self.store.check()

    def project_dir(self, project: str) -> str:
        if project in _RESERVED:
            raise ConfigError(f"project name {project!r} is reserved in an object store (it holds the shared "
                              f"files); choose another name")
        return self.store.path(check_segment(project, "project name"))

    def run(self, project: str, run_id: str) -> ObjectRun:
        return ObjectRun(self.store, f"{self.project_dir(project)}/{check_segment(run_id, 'run id')}")

    def lock_project(self, project: str) -> Any:
        return contextlib.nullcontext()  # run creation is a create-only write: no lock needed

    def projects(self) -> list[str]:
        """The projects under the prefix that hold at least one run, by name (the layout's
        reserved prefixes are not projects)."""
        names = [n for n in self.store.listdir(self.store.root)
                 if n not in _RESERVED and NAME.match(n) and not n.startswith(".")]
        return sorted(n for n in names if any(NAME.match(r) for r in self.store.listdir(self.store.path(n))))

    def runs(self, project: str) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for name in self.store.listdir(self.project_dir(project)):
            if NAME.match(name):
                meta = self.store.read_json(f"{self.project_dir(project)}/{name}/run.json", "run.json")
                if meta:
                    found.append((name, meta))
        return sorted(found, key=lambda r: str(r[1].get("created", "")))

    def named(self, project: str, name: str) -> str | None:
        return newest_named(self.runs(project), name)

    def find(self, project: str, wanted: str) -> str | None:
        if NAME.match(wanted) and self.run(project, wanted).exists():
            return wanted
        return self.named(project, wanted)

    def create(self, project: str, run_id: str | None, meta: Mapping[str, Any],
               new_id: Callable[[], str]) -> ObjectRun:
        """A new run with ``run.json``, written create-only (two processes never share a new id)."""
        while True:
            rid = run_id or new_id()
            rdir = self.run(project, rid)
            body = {"run_id": rid, "project": project, "created": now_iso(),
                    **meta, "name": meta.get("name") or rid}
            try:
                rdir.write_meta(body, create=True)
                return rdir
            except FileExistsError:
                if run_id is not None:
                    return rdir  # attached by another process meanwhile: the same run
                continue

    def describe(self, project: str, limit: int = 10) -> str:
        return describe_runs(self.runs(project), limit)
