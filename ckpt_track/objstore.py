"""Checkpoint stores on object storage (S3 and anything else fsspec opens), for
``[local] root = "s3://bucket/prefix"``.

There is no rename and no lock on an object store, so the layout is built so that neither
is needed::

    <prefix>/objects/<xxh3-128>                         every file of every version, content-addressed:
                                                        shared by all projects and runs under the prefix
    <prefix>/<project>/<run_id>/run.json                name, created, config, last_version
    <prefix>/<project>/<run_id>/aliases.json            {"latest": 3, "best": 2}
    <prefix>/<project>/<run_id>/checkpoints/v000003.json   the version's manifest: the commit

A version is committed by writing its manifest last with a create-only conditional write
(``If-None-Match: *`` on S3); the write that finds the number taken moves on to the next one,
so two writers never share a version.  Objects are uploaded first (a file the prefix already
holds at the same hash and size is not sent again: dedup across runs, and an interrupted upload
resumes where it stopped).  A crash leaves only objects no manifest names; ``gc`` removes them.

Credentials and endpoint come from the standard places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles) and the ``[storage]`` settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import STORAGE_KEYS
from .errors import (
    AuthError,
    BackendNotInstalled,
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
    IntegrityError,
)
from .format import MANIFEST, FileEntry, LocalCheckpoint, Manifest, is_blob, now_iso, parse_manifest, read_manifest
from .format.files import load_json
from .format.manifest import MAX_MANIFEST_BYTES
from .plan import next_version
from .progress import transfer_callback

__all__ = ["STORAGE_KEYS", "ObjectRun", "ObjectStore", "Version", "is_url", "open_fs", "storage_errors",
           "storage_options"]

VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")
NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HASH = re.compile(r"^[0-9a-f]{32}$")
MAX_TABLE_BYTES = 4 * 1024 * 1024  # run.json / aliases.json
_CLAIM_TRIES = 64  # version numbers tried when other writers take them meanwhile
_RESERVED = frozenset({"objects", "records"})  # top-level prefixes of the layout
MIN_PART = 5 * 1024 * 1024
GC_GRACE_S = 3600.0  # an unreferenced object younger than this may belong to a save in progress
_S3_DEFAULTS: dict[str, Any] = {  # fail in seconds, not minutes: the upload thread retries on its own
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3, "mode": "standard"}},
}


_BOOL_KEYS = ("anon", "requester_pays", "use_ssl", "version_aware")
_INT_KEYS = ("max_concurrency", "default_block_size")


def parse_size(value: Any, what: str) -> int:
    """Bytes from an int or a string such as ``'64MiB'`` (the settings' size syntax)."""
    from .config_values import Invalid, _as_size

    try:
        return _as_size(value, True)
    except Invalid as exc:
        raise ConfigError(f"{what}: {exc}, got {value!r}") from None


def storage_options(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments from the ``[storage]`` section (environment strings coerced)."""
    from .options import parse_bool

    opts = {k: v for k, v in dict(section or {}).items()
            if k not in ("url", "replicas", "options", "part_size") and v != ""}
    for key in _BOOL_KEYS:
        if key in opts:
            opts[key] = parse_bool(opts[key], f"[storage] {key}")
    for key in _INT_KEYS:
        if key in opts:
            try:
                opts[key] = int(opts[key])
            except (TypeError, ValueError):
                raise ConfigError(f"[storage] {key} must be an integer, got {opts[key]!r}") from None
    region = opts.pop("region", None)
    if region:
        opts["client_kwargs"] = {**dict(opts.get("client_kwargs") or {}), "region_name": str(region)}
    extra = dict(section or {}).get("options") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"[storage] options must be a table of fsspec arguments, not {extra!r}")
    return {**opts, **extra}


def is_url(text: str) -> bool:
    """True for an fsspec URL other than a local path (``file://`` and plain paths are local)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.lower() not in ("file", "local") and scheme.isidentifier()


def open_fs(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url`` (``[storage]`` options passed on)."""
    try:
        import fsspec
    except ImportError as exc:
        raise BackendNotInstalled(f"{url}: object storage needs fsspec: pip install 'ckpt-track[s3]'") from exc
    scheme = url.partition("://")[0].lower()
    # a fresh instance: fsspec's cache keys on the arguments, not on the environment they read
    opts = {"skip_instance_cache": True, **dict(options or {})}
    if scheme in ("s3", "s3a"):
        for key, value in _S3_DEFAULTS.items():
            opts.setdefault(key, value)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as exc:
        extra = "s3" if scheme in ("s3", "s3a") else scheme
        raise BackendNotInstalled(
            f"{url}: fsspec has no {scheme}:// implementation installed ({exc}); "
            f"pip install 'ckpt-track[{extra}]'" if extra == "s3" else f"{url}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{url}: not a storage URL fsspec can open ({exc}); check [local] root / "
                          "[storage] url and the [storage] options") from exc
    return fs, path.rstrip("/")


def _translate(exc: Exception, what: str, url: str) -> CkptTrackError:
    text = str(exc)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text or "NoCredentialsError" in type(exc).__name__ \
            or "Unable to locate credentials" in text:
        return AuthError(
            f"{what}: {url} refused the credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or [storage] key / secret) to a key allowed to read and write there")
    if _no_bucket(exc):
        return ConfigError(f"{what}: the bucket of {url} does not exist ({text}); create it, or point "
                           "[local] root / [storage] url at an existing bucket")
    return BackendUnavailable(
        f"{what}: {url} is unreachable ({type(exc).__name__}: {text}); check that the object store is running "
        "and AWS_ENDPOINT_URL / [storage] endpoint_url; pending checkpoints stay on local disk and are retried")


@contextlib.contextmanager
def storage_errors(what: str, url: str) -> Iterator[None]:
    """The object store's boundary: ckpt_track errors and a missing object (``FileNotFoundError``,
    the caller decides) pass; everything else becomes a typed error naming what to fix."""
    try:
        yield
    except (CkptTrackError, FileExistsError):
        raise
    except FileNotFoundError as exc:
        if _no_bucket(exc):
            raise _translate(exc, what, url) from exc
        raise
    except Exception as exc:
        raise _translate(exc, what, url) from exc


def _no_bucket(exc: BaseException) -> bool:
    return "bucket does not exist" in str(exc).lower() or "NoSuchBucket" in str(exc)


def _absent(exc: FileNotFoundError) -> None:
    """Inside :func:`storage_errors`: a missing object is an answer, a missing bucket is not."""
    if _no_bucket(exc):
        raise exc


def _taken(exc: BaseException) -> bool:
    """A create-only write found the object there (S3: 412 PreconditionFailed; local: exists)."""
    if isinstance(exc, FileExistsError):
        return True
    text = str(exc)
    return "pre-condition" in text or "PreconditionFailed" in text or "412" in text


def check_segment(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ConfigError(f"{what} {value!r} may only hold letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Version:
    """One committed version of a run in the object store (``path``: its manifest's URL)."""

    number: int
    path: str
    manifest: Manifest
    aliases: tuple[str, ...]


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

    def upload(self, local: Mapping[str, Path], what: str) -> int:
        """Send the local files to their object paths unless already there at that size; returns
        the bytes sent.  Large files go in parallel multipart parts; a progress bar on a terminal."""
        sizes = {p: f.stat().st_size for p, f in local.items()}
        have = self.sizes(list(local))
        todo = [p for p in local if have[p] != sizes[p]]
        if not todo:
            return 0
        total = sum(sizes[p] for p in todo)
        with storage_errors(f"uploading {what}", self.url), transfer_callback(f"upload {what}", total) as cb:
            self.fs.put([str(local[p]) for p in todo], todo, callback=cb, **self.put_kwargs)
        return total

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

    # -- projects and runs ------------------------------------------------------------------
    def project_dir(self, project: str) -> str:
        if project in _RESERVED:
            raise ConfigError(f"project name {project!r} is reserved in an object store (it holds the shared "
                              f"files); choose another name")
        return self.path(check_segment(project, "project name"))

    def run(self, project: str, run_id: str) -> ObjectRun:
        return ObjectRun(self, f"{self.project_dir(project)}/{check_segment(run_id, 'run id')}")

    def lock_project(self, project: str) -> Any:
        return contextlib.nullcontext()  # run creation is a create-only write: no lock needed

    def runs(self, project: str) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for name in self.listdir(self.project_dir(project)):
            if NAME.match(name):
                meta = self.read_json(f"{self.project_dir(project)}/{name}/run.json", "run.json")
                if meta:
                    found.append((name, meta))
        return sorted(found, key=lambda r: str(r[1].get("created", "")))

    def named(self, project: str, name: str) -> str | None:
        matches = [rid for rid, meta in self.runs(project) if meta.get("name") == name]
        return matches[-1] if matches else None

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
        runs = self.runs(project)
        return ", ".join(f"{rid} ({meta.get('name', rid)})" for rid, meta in runs[-limit:]) or "none"

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
            sent = self.store.upload(local, where)
            raw = (ckpt.path / MANIFEST).read_bytes()
        except OSError as exc:
            if isinstance(exc, CkptTrackError):
                raise
            raise CheckpointWriteError(f"could not read {where} at {ckpt.path}: {exc}") from exc
        number = self._claim(raw, where)
        # a gc that read the manifests before this commit may have removed a shared object since
        # the upload found it: send what is missing again, now that the manifest protects it
        sent += self.store.upload(local, where)
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
