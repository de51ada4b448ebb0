"""One object store: projects of runs under an fsspec URL, its objects, reference counting and gc."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    ConfigError,
    IntegrityError,
)
from ..format import MANIFEST, FileEntry, Manifest, parse_manifest
from ..format.files import load_json
from ..format.manifest import MAX_MANIFEST_BYTES
from ..progress import transfer_callback
from .fsio import MIN_PART, _absent, _taken, open_fs, parse_size, storage_errors

__all__ = ["GC_GRACE_S", "ObjectStore"]

VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")
_HASH = re.compile(r"^[0-9a-f]{32}$")
MAX_TABLE_BYTES = 4 * 1024 * 1024  # run.json / aliases.json
_RESERVED = frozenset({"objects", "records"})  # top-level prefixes of the layout
GC_GRACE_S = 3600.0  # an unreferenced object younger than this may belong to a save in progress


class ObjectStore:
    """Projects of runs under one fsspec URL; every file operation of the store goes through here."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *, part_size: Any = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = open_fs(self.url, options)
        # S3 multipart: parts of this size go up in parallel (s3fs' max_concurrency at a time)
        self.put_kwargs: dict[str, Any] = {}
        if part_size not in (None, "") and "s3" in getattr(self.fs, "protocol", ()):
            size = parse_size(part_size, "[storage] part_size")
            if size < MIN_PART:
                raise ConfigError(f"[storage] part_size must be at least 5 MiB (S3's smallest part), got {part_size!r}")
            self.put_kwargs["chunksize"] = size

    def check(self) -> None:
        """Fail early and clearly when the bucket (the URL's first segment) is missing or the
        credentials are refused, before a save is spooled for a store that cannot take it."""
        bucket = self.root.split("/", 1)[0]
        if not bucket:
            return  # a store without buckets (a path from the root of its filesystem)
        with storage_errors("opening the store", self.url):
            try:
                self.fs.info(bucket)
            except FileNotFoundError as exc:
                raise ConfigError(f"the bucket {bucket!r} of {self.url} does not exist ({exc}); create it, or "
                                  "point [local] root / [storage] url at an existing bucket") from exc

    # -- object primitives ----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def show(self, path: str) -> str:
        """A path as the user wrote it (with its scheme)."""
        return self.fs.unstrip_protocol(path)

    def object_path(self, entry: FileEntry) -> str:
        if not _HASH.match(entry.hash):
            raise IntegrityError(f"manifest names a file by hash {entry.hash!r}, which is not an xxh3-128 digest")
        return self.path("objects", entry.hash)

    def cat(self, path: str, limit: int, what: str) -> bytes | None:
        """A small object's bytes (None when absent); larger than ``limit`` is an IntegrityError."""
        with storage_errors(f"reading {what}", self.show(path)):
            try:
                raw = self.fs.cat_file(path, start=0, end=limit + 1)
            except FileNotFoundError as exc:
                _absent(exc)
                return None
        if len(raw) > limit:
            raise IntegrityError(f"{self.show(path)} is larger than {limit} bytes; it is damaged or hostile")
        return bytes(raw)

    def read_json(self, path: str, what: str) -> dict[str, Any]:
        raw = self.cat(path, MAX_TABLE_BYTES, what)
        if raw is None:
            return {}
        data = load_json(raw, self.show(path))
        if not isinstance(data, dict):
            raise IntegrityError(f"{self.show(path)} is damaged: not a JSON object")
        return data

    def write(self, path: str, data: bytes, what: str, *, create: bool = False) -> None:
        """Write one small object whole; ``create``: only if absent (``FileExistsError`` otherwise)."""
        with storage_errors(f"writing {what}", self.show(path)):
            try:
                self.fs.pipe_file(path, data, mode="create" if create else "overwrite")
            except Exception as exc:
                if create and _taken(exc):
                    raise FileExistsError(self.show(path)) from exc
                raise

    def write_json(self, path: str, data: Any, what: str, *, create: bool = False) -> None:
        import json

        self.write(path, json.dumps(data, indent=1, sort_keys=True).encode(), what, create=create)

    def sizes(self, paths: Sequence[str]) -> dict[str, int | None]:
        """Each object's size (None when absent), asked concurrently where fsspec is async."""
        async def one(p: str) -> int | None:
            try:
                return int((await self.fs._info(p))["size"])
            except FileNotFoundError as exc:
                _absent(exc)
                return None

        with storage_errors("looking up objects", self.url):
            if getattr(self.fs, "async_impl", False) and paths:
                from fsspec.asyn import sync

                async def every() -> list[int | None]:
                    return list(await asyncio.gather(*(one(p) for p in paths)))

                return dict(zip(paths, sync(self.fs.loop, every), strict=True))
            out: dict[str, int | None] = {}
            for p in paths:
                try:
                    out[p] = int(self.fs.info(p)["size"])
                except FileNotFoundError as exc:
                    _absent(exc)
                    out[p] = None
            return out

    def upload(self, local: Mapping[str, Path], what: str) -> tuple[int, list[str]]:
        """Send the local files to their object paths unless already there at that size; returns
        the bytes sent and the paths found there (not sent).  Large files go in parallel multipart
        parts; a progress bar on a terminal."""
        sizes = {p: f.stat().st_size for p, f in local.items()}
        have = self.sizes(list(local))
        todo = [p for p in local if have[p] != sizes[p]]
        found = [p for p in local if have[p] == sizes[p]]
        if not todo:
            return 0, found
        total = sum(sizes[p] for p in todo)
        with storage_errors(f"uploading {what}", self.url), transfer_callback(f"upload {what}", total) as cb:
            self.fs.put([str(local[p]) for p in todo], todo, callback=cb, **self.put_kwargs)
        return total, found

    def download(self, remote: Mapping[str, Path], what: str, total: int = 0) -> None:
        if not remote:
            return
        with storage_errors(f"downloading {what}", self.url), transfer_callback(f"download {what}", total) as cb:
            try:
                self.fs.get(list(remote), [str(p) for p in remote.values()], callback=cb)
            except FileNotFoundError as exc:
                raise IntegrityError(f"{what}: an object it names is missing from {self.url} ({exc}); the "
                                     "version is incomplete: restore another one") from exc

    def remove(self, paths: Sequence[str], what: str) -> None:
        if not paths:
            return
        with storage_errors(f"removing {what}", self.url), contextlib.suppress(FileNotFoundError):
            self.fs.rm(list(paths))

    def listdir(self, path: str) -> list[str]:
        """Base names directly under ``path`` ([] when absent)."""
        with storage_errors("listing", self.show(path)):
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError as exc:
                _absent(exc)
                return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def manifests(self) -> Iterator[tuple[str, Manifest | None]]:
        """Every version manifest under the prefix (None: unreadable), for reference counting."""
        with storage_errors("listing versions", self.url):
            found = self.fs.glob(self.path("*", "*", "checkpoints", "v*.json"))
            # tracker records with their files here (ckpt_track.external)
            found += self.fs.glob(self.path("records", "*", "*", "*", "*.json"))
        for path in found:
            if VERSION_FILE.match(path.rsplit("/", 1)[-1]) or path.startswith(self.path("records") + "/"):
                raw = self.cat(path, MAX_MANIFEST_BYTES, "a manifest")
                try:
                    yield path, (parse_manifest(raw, self.show(path)) if raw is not None else None)
                except IntegrityError:
                    yield path, None

    def referenced(self) -> set[str] | None:
        """Object paths some version under the prefix names; None when a manifest could not be
        read (then nothing may be deleted: it might name any object)."""
        names: set[str] = set()
        for _path, manifest in self.manifests():
            if manifest is None:
                return None
            names.update(self.object_path(e) for f, e in manifest.files.items() if f != MANIFEST)
        return names

    def release(self, path: str, raw: bytes | None = None) -> None:
        """Remove the manifest at ``path`` (from then on it is no version), then its objects that
        no other version under the prefix references (left to ``gc`` when that is unknown)."""
        if raw is None:
            raw = self.cat(path, MAX_MANIFEST_BYTES, "a manifest")
        self.remove([path], "a version's manifest")
        if raw is None:
            return
        try:
            manifest = parse_manifest(raw, self.show(path))
        except IntegrityError:
            return
        refs = self.referenced()
        if refs is None:
            return
        mine = {self.object_path(e) for f, e in manifest.files.items() if f != MANIFEST}
        self.remove(sorted(mine - refs), "unreferenced objects")

    def collect(self, *, dry_run: bool = False, grace_s: float = GC_GRACE_S) -> tuple[list[str], int]:
        """Remove objects no version under the prefix references and older than ``grace_s`` (a save
        in progress uploads its objects before its manifest); returns their URLs and bytes."""
        refs = self.referenced()
        if refs is None:
            raise IntegrityError(f"{self.url}: a manifest could not be read, so which objects are in use is unknown; "
                                 "run `ckpt-track verify` on the damaged versions and delete them first")
        with storage_errors("listing objects", self.url):
            try:
                listing = self.fs.ls(self.path("objects"), detail=True, refresh=True)
            except FileNotFoundError:
                listing = []
        now = time.time()
        doomed, size = [], 0
        for info in listing:
            name = info["name"].rstrip("/")
            if name in refs or not _HASH.match(name.rsplit("/", 1)[-1]):
                continue
            modified = info.get("LastModified") or info.get("mtime") or info.get("created")
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or now)
            if now - stamp >= grace_s:
                doomed.append(name)
                size += int(info.get("size") or 0)
        if not dry_run:
            self.remove(doomed, "unreferenced objects")
        return [self.show(p) for p in doomed], size


