"""A fake W&B server, faked at the SDK's client objects (the real server is Docker-only).

What is faked and why: ``wandb.Api`` (read path: ``run``, ``runs``, ``artifact``,
``default_entity``; public ``Run.logged_artifacts``; ``Artifact.download/save/delete``,
``Artifact.manifest`` (the SDK's own manifest class, parsed from the JSON the server keeps))
and the online-only part of a live run (``log_artifact(...).wait()``, ``use_artifact``,
``link_artifact``).  Everything else is the real SDK: ``wandb.init`` runs for real in
offline mode underneath, so ``wandb.Artifact``, ``add_file`` (MD5 digests), ``log``,
``define_metric``, ``config`` and the ``.wandb`` record log are W&B's own code.

The server receives what the real SDK produced: a logged ``wandb.Artifact`` (its
manifest entries point at the files; the server copies them and checks each MD5, as
an upload would), or, through :meth:`FakeServer.sync`, the artifact records of finished
offline runs read back from their ``.wandb`` logs, like ``wandb sync``.  Server rules
kept: versions ``v0, v1, ...`` per collection, never reused; identical content (same
digest) is the same version; an alias is on one version of a collection at a time and
``latest`` follows the newest version; ``delete`` refuses aliased versions unless
``delete_aliases=True``; missing key → ``UsageError``, unknown server → connection failure.
Each version keeps all its files; like W&B's dedup, :attr:`FakeServer.received` counts per new
version only the bytes of files whose MD5 the collection's ``latest`` version did not hold.

``tests/test_backend_wandb.py`` checks that every faked name exists in the installed
SDK with a compatible signature (:data:`FAKED`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb
from wandb.apis.public.runs import RunNotFoundError
from wandb.errors import AuthenticationError, CommError, UsageError
from wandb.proto import wandb_api_pb2, wandb_internal_pb2
from wandb.sdk.artifacts.artifact_manifest import ArtifactManifest
from wandb.sdk.lib.service.service_connection import WandbApiFailedError
from wandb.sdk.lib.urls import DEFAULT_BASE_URL

__all__ = ["FAKED", "FakeApi", "FakeArtifact", "FakeLiveRun", "FakePublicRun", "FakeServer", "FakeWandb",
           "finished_records", "md5_b64", "read_records"]

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_clock = itertools.count(1)


# -- the .wandb record log -------------------------------------------------------------------
def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every ``Record`` in a ``run-<id>.wandb`` log: LevelDB-style 32 KiB blocks of
    chunks, each with a 7-byte header (crc32c, little-endian length, type)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record log")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if kind in (_FULL, _FIRST):
            pending = b""
        pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run's log.  ``run.finish()`` can return before wandb-core has
    flushed the file, so wait (bounded) for the closing ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(path)) if Path(path).stat().st_size > _HEADER else []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout:.0f} s: the run did not finish")
        time.sleep(0.05)


def md5_b64(path: Path) -> str:
    """W&B's file digest: base64 of the MD5."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


# -- server state -----------------------------------------------------------------------------
@dataclass
class _Version:
    collection: tuple[str, str, str]  # entity, project, name
    index: int
    type: str
    digest: str
    metadata: dict[str, Any]
    files: Path
    entries: dict[str, tuple[str, int]]  # artifact path -> (MD5 b64, size), the version's manifest
    size: int
    created_at: str
    aliases: set[str] = field(default_factory=set)
    deleted: bool = False


@dataclass
class _Run:
    entity: str
    project: str
    run_id: str
    display_name: str
    order: int
    logged: list[_Version] = field(default_factory=list)
    used: list[_Version] = field(default_factory=list)
    finished: bool = False


class FakeServer:
    """One W&B deployment: runs, artifact collections and uploaded files under ``root``."""

    def __init__(self, root: Path, base_url: str = DEFAULT_BASE_URL, default_entity: str = "acme") -> None:
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self.default_entity = default_entity
        self.runs: dict[tuple[str, str, str], _Run] = {}
        self.collections: dict[tuple[str, str, str], list[_Version]] = {}
        self.links: list[tuple[str, str, list[str]]] = []  # (target, source artifact, aliases)
        self.downloads = 0
        self.received: list[int] = []  # bytes uploaded for each new version, after digest dedup
        self._synced: set[Path] = set()

    def run(self, entity: str, project: str, run_id: str, name: str | None = None) -> _Run:
        key = (entity, project, run_id)
        if key not in self.runs:
            self.runs[key] = _Run(entity, project, run_id, name or run_id, next(_clock))
        elif name:
            self.runs[key].display_name = name
        return self.runs[key]

    def commit(self, run: _Run, name: str, type: str, metadata: dict[str, Any], digest: str,
               aliases: list[str], files: dict[str, tuple[Path, str, int]]) -> _Version:
        """Receive a logged artifact: ``files`` maps artifact path -> (local file, MD5 b64, size)."""
        key = (run.entity, run.project, name)
        versions = self.collections.setdefault(key, [])
        same = next((v for v in versions if not v.deleted and v.digest == digest), None)
        if same is None:
            latest = next((v for v in versions if "latest" in v.aliases), None)
            held = {d for d, _ in latest.entries.values()} if latest else set()
            self.received.append(sum(size for _, md5, size in files.values() if md5 not in held))
            index = len(versions)  # deleted versions keep their number
            where = self.root / "/".join(key) / f"v{index}"
            for path, (local, md5, size) in files.items():
                if md5_b64(local) != md5 or os.path.getsize(local) != size:
                    raise CommError(f"upload of {path} failed: {local} does not match its manifest entry")
                (where / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, where / path)
            same = _Version(key, index, type, digest, dict(metadata), where,
                            {path: (md5, size) for path, (_, md5, size) in files.items()},
                            sum(f[2] for f in files.values()), f"2026-11-23T12:00:{next(_clock) % 60:02d}Z")
            versions.append(same)
            run.logged.append(same)
            aliases = ["latest", *aliases]
        self.set_aliases(same, set(same.aliases) | set(aliases))
        return same

    def set_aliases(self, version: _Version, aliases: set[str]) -> None:
        for other in self.collections[version.collection]:
            if other is not version:
                other.aliases -= aliases  # an alias names one version of a collection
        version.aliases = set(aliases)

    def find(self, entity: str, project: str, name: str, selector: str) -> _Version:
        versions = [v for v in self.collections.get((entity, project, name), []) if not v.deleted]
        for v in versions:
            if selector == f"v{v.index}" or selector in v.aliases:
                return v
        msg = f"artifact membership '{name}:{selector}' not found in '{entity}/{project}'"
        raise CommError(msg, ValueError(msg))  # what Api.artifact raises (normalize_exceptions)

    def sync(self, wandb_dir: Path) -> list[str]:
        """``wandb sync``: replay finished offline runs under ``wandb_dir``; returns their paths."""
        synced = []
        for log in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
            if log in self._synced:
                continue
            run = None
            for record in finished_records(log):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    r = record.run
                    run = self.run(r.entity or self.default_entity, r.project, r.run_id, r.display_name or None)
                elif kind == "artifact" and run is not None:
                    a = record.artifact
                    files = {c.path: (Path(c.local_path), c.digest, c.size) for c in a.manifest.contents}
                    self.commit(run, a.name, a.type, json.loads(a.metadata or "{}"), a.digest, list(a.aliases), files)
            self._synced.add(log)
            if run is not None:
                synced.append(f"{run.entity}/{run.project}/{run.run_id}")
        return synced


# -- the client objects ----------------------------------------------------------------------------
def _unreachable(base_url: str) -> AuthenticationError:
    cause = WandbApiFailedError("Failed to execute API request: the service process is busy and did not respond "
                                "in time.")
    error = AuthenticationError(f"Failed to verify credentials with {base_url}: {cause}")
    error.__cause__ = cause
    return error


class FakeArtifact:
    """A logged artifact version as ``wandb.Api().artifact()`` returns it."""

    def __init__(self, server: FakeServer, version: _Version) -> None:
        self._server, self._v = server, version
        self._aliases = sorted(version.aliases)
        self._saved = list(self._aliases)

    @property
    def name(self) -> str:
        return f"{self._v.collection[2]}:v{self._v.index}"

    @property
    def qualified_name(self) -> str:
        entity, project, _ = self._v.collection
        return f"{entity}/{project}/{self.name}"

    @property
    def version(self) -> str:
        return f"v{self._v.index}"

    @property
    def type(self) -> str:
        return self._v.type

    @property
    def digest(self) -> str:
        return self._v.digest

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._v.metadata))

    @property
    def size(self) -> int:
        return self._v.size

    @property
    def created_at(self) -> str:
        return self._v.created_at

    @property
    def manifest(self) -> ArtifactManifest:
        contents = {path: {"digest": md5, "size": size} for path, (md5, size) in self._v.entries.items()}
        return ArtifactManifest.from_manifest_json({"version": 1, "storagePolicy": "wandb-storage-policy-v1",
                                                    "storagePolicyConfig": {"storageLayout": "V2"},
                                                    "contents": contents})

    @property
    def aliases(self) -> list[str]:
        return self._aliases

    @aliases.setter
    def aliases(self, aliases: list[str]) -> None:
        self._aliases = list(aliases)

    def wait(self, timeout: int | None = None) -> FakeArtifact:
        return self

    def save(self) -> None:
        if self._v.deleted:
            raise CommError(f"artifact {self.qualified_name} was deleted")
        added, removed = set(self._aliases) - set(self._saved), set(self._saved) - set(self._aliases)
        self._server.set_aliases(self._v, (self._v.aliases - removed) | added)
        self._saved = list(self._aliases)

    def delete(self, delete_aliases: bool = False) -> None:
        if self._v.aliases and not delete_aliases:
            raise CommError(f"cannot delete {self.qualified_name}: it has aliases {sorted(self._v.aliases)}; "
                            "pass delete_aliases=True")
        self._v.deleted, self._v.aliases = True, set()
        shutil.rmtree(self._v.files, ignore_errors=True)

    def download(self, root: str | None = None, allow_missing_references: bool = False,
                 skip_cache: bool | None = None) -> str:
        if self._v.deleted:
            raise CommError(f"artifact {self.qualified_name} was deleted")
        self._server.downloads += 1
        target = Path(root or f"./artifacts/{self.name}")
        shutil.copytree(self._v.files, target, dirs_exist_ok=True)
        return str(target)


class FakePublicRun:
    """``wandb.Api().run(path)``."""

    def __init__(self, server: FakeServer, run: _Run) -> None:
        self._server, self._run = server, run

    @property
    def id(self) -> str:
        return self._run.run_id

    @property
    def name(self) -> str | None:
        return self._run.display_name

    @property
    def entity(self) -> str:
        return self._run.entity

    def logged_artifacts(self, per_page: int = 100) -> list[FakeArtifact]:
        return [FakeArtifact(self._server, v) for v in self._run.logged if not v.deleted]


class FakeApi:
    """``wandb.Api``; :meth:`FakeWandb.install` binds a subclass to its servers."""

    _world: FakeWandb

    def __init__(self, overrides: dict[str, Any] | None = None, timeout: int | None = None,
                 api_key: str | None = None) -> None:
        key = api_key or os.environ.get("WANDB_API_KEY")
        if not key:
            raise UsageError("No API key configured. Use `wandb login` to log in.")
        self._server = self._world.server((overrides or {}).get("base_url"))
        if key not in self._world.valid_keys:
            response = wandb_api_pb2.ApiErrorResponse(message="user is not logged in", http_status=401)
            cause = WandbApiFailedError("user is not logged in", response)
            raise AuthenticationError(f"Failed to verify credentials with {self._server.base_url}: {cause}") from cause

    @property
    def default_entity(self) -> str | None:
        return self._server.default_entity

    def run(self, path: str = "") -> FakePublicRun:
        parts = path.split("/")
        run = self._server.runs.get(tuple(parts)) if len(parts) == 3 else None  # type: ignore[arg-type]
        if run is None:
            raise RunNotFoundError(f"Could not find run {path}")
        return FakePublicRun(self._server, run)

    def runs(self, path: str | None = None, filters: dict[str, Any] | None = None,
             order: str = "+created_at") -> list[FakePublicRun]:
        entity, project = (path or "").split("/")
        unknown = set(filters or {}) - {"displayName"}
        if unknown:
            raise ValueError(f"the fake server only filters by displayName, not {sorted(unknown)}")
        wanted = (filters or {}).get("displayName")
        in_project = [r for r in self._server.runs.values() if (r.entity, r.project) == (entity, project)]
        if not in_project:  # the SDK raises this while iterating a project the server does not know
            raise ValueError(f"Could not find project {project}")
        found = sorted((r for r in in_project if wanted is None or r.display_name == wanted), key=lambda r: r.order,
                       reverse=order.startswith("-"))
        return [FakePublicRun(self._server, r) for r in found]

    def artifact(self, name: str, type: str | None = None) -> FakeArtifact:
        entity, project, rest = name.split("/")
        collection, _, selector = rest.partition(":")
        return FakeArtifact(self._server, self._server.find(entity, project, collection, selector or "latest"))


class FakeLiveRun:
    """The run ``wandb.init`` returns, online: a real offline run underneath, whose logged
    artifacts the fake server receives as an upload would."""

    def __init__(self, real: Any, server: FakeServer, entity: str) -> None:
        self._real, self._server = real, server
        self._run = server.run(entity, real.project, real.id, real.name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)  # log, define_metric, config, id, name, project, ...

    @property
    def entity(self) -> str:
        return self._run.entity

    @property
    def offline(self) -> bool:
        return False

    def log_artifact(self, artifact_or_path: wandb.Artifact, name: str | None = None, type: str | None = None,
                     aliases: list[str] | None = None) -> FakeArtifact:
        self._real.log_artifact(artifact_or_path, aliases=aliases)  # the real record, written offline
        a = artifact_or_path
        files = {path: (Path(e.local_path), e.digest, e.size) for path, e in a.manifest.entries.items()}
        version = self._server.commit(self._run, a.name.split(":")[0], a.type, a.metadata, a.digest,
                                      list(aliases or []), files)
        return FakeArtifact(self._server, version)

    def use_artifact(self, artifact_or_name: str | FakeArtifact, type: str | None = None,
                     aliases: list[str] | None = None) -> FakeArtifact:
        if isinstance(artifact_or_name, FakeArtifact):
            art = artifact_or_name
        else:
            entity, project, rest = artifact_or_name.split("/")
            collection, _, selector = rest.partition(":")
            art = FakeArtifact(self._server, self._server.find(entity, project, collection, selector))
        self._run.used.append(art._v)
        return art

    def link_artifact(self, artifact: FakeArtifact, target_path: str, aliases: list[str] | None = None) -> FakeArtifact:
        self._server.links.append((target_path, artifact.qualified_name, list(aliases or [])))
        return artifact

    def finish(self, exit_code: int | None = None) -> None:
        self._real.finish(exit_code)
        self._run.finished = True


class FakeWandb:
    """Servers by base URL; :meth:`install` points ``wandb.Api`` and ``wandb.init`` at them."""

    def __init__(self, *servers: FakeServer, valid_keys: tuple[str, ...] = ("k" * 40,)) -> None:
        self.servers = {s.base_url: s for s in servers}
        self.valid_keys = set(valid_keys)
        self._real_init = wandb.init

    def server(self, base_url: str | None) -> FakeServer:
        url = (base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if url not in self.servers:
            raise _unreachable(url)
        return self.servers[url]

    def install(self, monkeypatch: Any) -> FakeWandb:
        monkeypatch.setattr(wandb, "Api", type("Api", (FakeApi,), {"_world": self}))
        monkeypatch.setattr(wandb, "init", self.init)
        return self

    def init(self, entity: str | None = None, project: str | None = None, dir: str | None = None,
             id: str | None = None, name: str | None = None, config: dict[str, Any] | None = None,
             allow_val_change: bool | None = None, mode: str | None = None, reinit: Any = None,
             resume: Any = None, settings: Any = None) -> Any:
        """``wandb.init``: online runs become real offline runs reported to the fake server."""
        real = {"entity": entity, "project": project, "dir": dir, "id": id, "name": name, "config": config,
                "allow_val_change": allow_val_change, "reinit": reinit, "settings": settings}
        if mode != "online":
            return self._real_init(mode=mode, resume=resume, **real)
        server = self.server(getattr(settings, "base_url", None))
        entity = entity or server.default_entity
        exists = (entity, project, id) in server.runs
        if (resume == "must" and not exists) or (resume == "never" and exists):
            raise UsageError(f"resume={resume!r} but run {entity}/{project}/{id} {'does not ' * (not exists)}exist")
        return FakeLiveRun(self._real_init(mode="offline", **real), server, entity)


# (fake, real) pairs whose public names the signature test compares
FAKED: list[tuple[Any, Any]] = [
    (FakeApi.__init__, wandb.Api.__init__),
    (FakeApi, wandb.Api),
    (FakePublicRun, wandb.apis.public.Run),
    (FakeArtifact, wandb.Artifact),
    (FakeLiveRun, wandb.sdk.wandb_run.Run),
    (FakeWandb.init, wandb.init),
]
