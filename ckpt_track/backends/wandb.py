"""The ``wandb`` backend: each checkpoint is a version of the run's model artifact ``ckpt-<run id>``.

What W&B shows for a checkpoint logged here:

- an artifact version of type ``model`` holding every checkpoint file, added one by one:
  each version is self-contained, and a content-addressed tensor file
  (``t-<hash>.safetensors``) that did not change keeps its name and MD5, so W&B's
  digest dedup does not upload it again (``Stored.uploaded`` counts what is sent);
- its metadata: ``step``, ``epoch``, ``metrics``, ``created``, ``size``, ``lineage`` and
  ``manifest_xxh3`` (the hash of the ckpt_track manifest);
- the aliases the core decides (``latest``, ``best``, ``step-N``, your own); W&B keeps
  each alias on one version of the collection, so setting one moves it;
- the metrics in run history as ``checkpoint/<name>`` against the custom x-axis
  ``checkpoint/step`` (``define_metric``), never with ``log(step=)``: W&B drops rows whose
  step goes backwards, which a resume from an earlier checkpoint would cause;
- on resume the source artifact as an input of the new run (``use_artifact``), and in
  the run config as ``ckpt_track.resumed_from``;
- optionally (``registry``) each checkpoint that becomes ``best`` linked into a
  registry collection.

Versions: ckpt_track numbers versions from 1, W&B from 0, so ``wandb://e/p/<run>:vN``
is the W&B artifact ``e/p/ckpt-<run>:v<N-1>``.

Offline (``mode = "offline"``) the real SDK writes the run and its artifacts to the
``.wandb`` record log for a later ``wandb sync``, but nothing can be read back from W&B
offline.  So checkpoints also live in a small store next to the offline runs,
``<dir>/wandb/ckpt_track/<project>/<run id>/`` (``run.json`` plus ``v000001/`` ...),
and the record log points at those files in place; ``list``/``get`` read that store.
``mode = "disabled"`` keeps only that store and never calls W&B.  The SDK is imported
on first use only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from filelock import FileLock, Timeout

from ..errors import (
    AuthError,
    BackendError,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from ..format import (
    MANIFEST,
    LocalCheckpoint,
    copy_checkpoint,
    hash_file,
    is_blob,
    publish,
    read_manifest,
    verify,
)
from ..refs import Ref
from ..records import RunInfo, RunSpec, Stored
from ..boundary import sdk_errors

__all__ = ["ARTIFACT_PREFIX", "WandbBackend"]

ARTIFACT_PREFIX = "ckpt-"
_METRIC = "checkpoint/"
_ID = r"[A-Za-z0-9_.\-]+"
_SEGMENT = re.compile(rf"^{_ID}$")
_NATIVE = re.compile(rf"^(?:(?P<entity>{_ID})/)?(?P<project>{_ID})/(?P<name>{_ID}):(?P<sel>{_ID})$")
_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
# UI hosts of the W&B cloud (0.31 moved it to CoreWeave Forge under /wandb): no base_url needed
_SAAS = {"wandb.ai": (), "www.wandb.ai": (), "app.wandb.ai": (), "forge.coreweave.com": ("wandb",)}
_LOCK_TIMEOUT_S = 120.0
# W&B refuses a second wandb.init of a run already open in this process, so open runs are
# shared by every backend instance: key -> [live run, how many open_run calls hold it]
_LIVE: dict[tuple[str, ...], list[Any]] = {}
_LIVE_LOCK = threading.Lock()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _new_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _selector(sel: str) -> dict[str, Any]:
    """A W&B ``:vK`` or ``:alias`` as a Ref selector (W&B ``v0`` is our version 1)."""
    if re.fullmatch(r"v\d+", sel):
        return {"version": int(sel[1:]) + 1}
    return {"alias": sel}


def _artifact_ref(entity: str | None, project: str, name: str, sel: str | None, params: Mapping[str, str],
                  text: str) -> Ref:
    if not name.startswith(ARTIFACT_PREFIX) or len(name) == len(ARTIFACT_PREFIX):
        raise InvalidRef(f"{text!r}: W&B artifact {name!r} is not a ckpt_track checkpoint "
                         f"(those are named {ARTIFACT_PREFIX}<run id>)")
    path = "/".join(p for p in (entity, project, name[len(ARTIFACT_PREFIX):]) if p)
    try:
        return Ref("wandb", path, params=tuple(params.items()), **(_selector(sel) if sel else {}))
    except InvalidRef as exc:
        raise InvalidRef(f"{text!r}: {exc}") from None


def _parse_url(text: str) -> Ref | None:
    """Run and artifact pages of the W&B app: cloud, Forge, or a self-hosted host."""
    url = urlsplit(text)
    url.port  # noqa: B018 -- a port out of range raises ValueError: InvalidRef at refs.parse_ref
    host = (url.hostname or "").lower()
    parts = [unquote(p) for p in url.path.split("/") if p]
    known = host in _SAAS
    for i, seg in enumerate(parts):
        if seg not in ("runs", "artifacts") or i < 2:
            continue
        prefix, (entity, project), rest = parts[:i - 2], parts[i - 2:i], parts[i + 1:]
        if known and tuple(prefix) != _SAAS[host]:
            break
        params = {} if known else {"base_url": f"{url.scheme}://{url.netloc}" + "".join(f"/{p}" for p in prefix)}
        if not all(_SEGMENT.match(s) for s in (entity, project, *rest[:1 if seg == "runs" else 3])):
            break
        if seg == "runs" and rest:
            return Ref("wandb", f"{entity}/{project}/{rest[0]}", params=tuple(params.items()))
        if seg == "artifacts" and len(rest) >= 2:
            if rest[0] != "model":
                raise InvalidRef(f"{text!r}: ckpt_track checkpoints are W&B artifacts of type 'model', not {rest[0]!r}")
            return _artifact_ref(entity, project, rest[1], rest[2] if len(rest) > 2 else None, params, text)
        break
    if known:
        raise InvalidRef(f"{text!r}: not a W&B run or model artifact page; expected "
                         "https://wandb.ai/<entity>/<project>/runs/<run id> or "
                         ".../artifacts/model/ckpt-<run id>/v<N>")
    return None


class WandbBackend:
    """Checkpoints as versions of a W&B model artifact, one collection per run."""

    name: ClassVar[str] = "wandb"
    options: ClassVar[frozenset[str]] = frozenset({"entity", "project", "mode", "dir", "base_url", "registry"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete", "choose_run_id", "dedup"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - self.options
        if unknown:
            raise ConfigError(f"wandb backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}"
                              " (the API key is read from WANDB_API_KEY, never from settings)")
        raw_mode = str(options.get("mode") or os.environ.get("WANDB_MODE") or "online").lower()
        if raw_mode not in _MODES:
            raise ConfigError(f"wandb backend: mode {raw_mode!r} is not one of 'online', 'offline', 'disabled'")
        self.mode: str = _MODES[raw_mode]
        self.entity: str | None = options.get("entity") or os.environ.get("WANDB_ENTITY") or None
        self.project: str | None = options.get("project") or None
        self.dir = Path(options.get("dir") or os.environ.get("WANDB_DIR") or ".").expanduser().absolute()
        self.base_url: str | None = str(options.get("base_url") or "").rstrip("/") or None
        self.registry: str | None = options.get("registry") or None
        self._api_obj: Any = None
        self._opened: list[tuple[str, ...]] = []  # keys of the live runs this instance holds
        self._lock = threading.Lock()

    # -- SDK boundary --------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return self.base_url or os.environ.get("WANDB_BASE_URL") or "the W&B cloud"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn W&B SDK errors into the ckpt_track tree, once, at the boundary."""
        with sdk_errors(self._translate, what):
            yield

    def _translate(self, exc: Exception, what: str) -> CkptTrackError:
        from wandb.apis.public.runs import RunNotFoundError
        from wandb.errors import CommError, UsageError

        text, status = str(exc), _http_status(exc)
        if isinstance(exc, UsageError) and re.search(r"api key|authenticat|log ?in", text, re.IGNORECASE):
            return AuthError(f"{what}: no W&B API key is configured for {self._where}; set WANDB_API_KEY "
                             "(or run `wandb login`), or set [wandb] mode = \"offline\"")
        if status in (401, 403):
            return AuthError(f"{what}: {self._where} rejected the W&B API key (HTTP {status}); "
                             "set WANDB_API_KEY to a valid key for that server")
        inner = getattr(exc, "exc", None)
        if status == 404 or isinstance(exc, RunNotFoundError) or (
                isinstance(inner, ValueError) and "not found" in str(inner)):
            return CheckpointNotFound(f"{what}: not found on {self._where} ({text})")
        if isinstance(exc, (CommError, ConnectionError, TimeoutError)):
            return BackendUnavailable(f"{what}: cannot reach {self._where} ({text}); check the network and "
                                      "[wandb] base_url, or set [wandb] mode = \"offline\"")
        if isinstance(exc, UsageError):
            return ConfigError(f"{what}: W&B rejected the request: {text}")
        return BackendError(f"{what} failed: {type(exc).__name__}: {text}")

    def _api(self) -> Any:
        with self._lock:
            if self._api_obj is None:
                import wandb
                import wandb.sdk.lib.retry

                from ..network import private_random

                # its backoff draws random.random(): keep W&B off the training's global generator
                private_random(wandb.sdk.lib.retry)
                overrides = {"base_url": self.base_url} if self.base_url else {}
                # the SDK reads WANDB_HTTP_TIMEOUT once, at import; honour it when set later
                raw = os.environ.get("WANDB_HTTP_TIMEOUT", "").strip()
                try:
                    timeout = max(1, round(float(raw))) if raw else None
                except ValueError:
                    raise ConfigError(f"WANDB_HTTP_TIMEOUT={raw!r} is not a number of seconds") from None
                with self._errors("connecting to the W&B API"):
                    self._api_obj = wandb.Api(overrides=overrides, timeout=timeout)
            return self._api_obj

    def _default_entity(self) -> str:
        if self.entity:
            return self.entity
        with self._errors("asking W&B for the default entity"):
            entity = self._api().default_entity
        if not entity:
            raise ConfigError("W&B has no default entity for this API key; set [wandb] entity or WANDB_ENTITY")
        return str(entity)

    # -- run identity ----------------------------------------------------------------------
    def _key(self, project: str, run_id: str) -> tuple[str, ...]:
        return (self.mode, self.base_url or "", project, run_id)

    def _live(self, project: str, run_id: str) -> Any:
        with _LIVE_LOCK:
            held = _LIVE.get(self._key(project, run_id))
            return held[0] if held else None

    def _hold(self, project: str, run_id: str, live: Any) -> None:
        key = self._key(project, run_id)
        with _LIVE_LOCK:
            held = _LIVE.setdefault(key, [live, 0])
            held[1] += 1
            self._opened.append(key)

    def _release(self, project: str, run_id: str) -> Any:
        """The live run to finish, once the last holder lets go of it."""
        key = self._key(project, run_id)
        with _LIVE_LOCK:
            if key not in self._opened or key not in _LIVE:
                return None
            self._opened.remove(key)
            held = _LIVE[key]
            held[1] -= 1
            if held[1] > 0:
                return None
            del _LIVE[key]
            return held[0]

    def _info(self, entity: str | None, project: str, run_id: str, name: str | None, resumed: bool) -> RunInfo:
        path = "/".join(p for p in (entity, project, run_id) if p)
        params = (("base_url", self.base_url),) if self.base_url else ()
        return RunInfo(backend=self.name, project=project, run_id=run_id, name=name or run_id,
                       ref=Ref(self.name, path, params=params), resumed=resumed,
                       native={"entity": entity or "", "mode": self.mode})

    def _artifact_path(self, run: RunInfo, selector: int | str) -> str:
        """W&B's name for one of our versions (0-based there), or for an alias."""
        name = f"{ARTIFACT_PREFIX}{run.run_id}:{f'v{selector - 1}' if isinstance(selector, int) else selector}"
        return "/".join(p for p in (run.native.get("entity"), run.project, name) if p)

    # -- runs ---------------------------------------------------------------------------
    def open_run(self, spec: RunSpec) -> RunInfo:
        project = self.project or spec.project
        for what, value in (("project", project), ("run id", spec.run_id)):
            if value is not None and not _SEGMENT.match(value):
                raise ConfigError(f"W&B {what} {value!r} may only hold letters, digits, '_', '.', '-'")
        entity = self._default_entity() if self.mode == "online" else self.entity
        run_id, resumed, name = self._existing(spec, entity, project)
        live = self._live(project, run_id) if run_id else None  # already open here: share it
        if live is None and self.mode != "disabled":
            live = self._init(spec, entity, project, run_id, resumed)
        if live is not None:
            run_id, entity, name = str(live.id), (live.entity or entity), (live.name or name)
        run_id = run_id or _new_id()
        if self.mode != "online":
            self._store_run(project, run_id, entity, name, spec.config)
        if live is not None:
            self._hold(project, run_id, live)
        return self._info(entity, project, run_id, name, resumed)

    def _existing(self, spec: RunSpec, entity: str | None, project: str) -> tuple[str | None, bool, str | None]:
        """The run id to use, whether that run already exists (per ``spec.resume``), and its name."""
        if spec.run_id is not None:
            found = self._lookup(entity, project, spec.run_id, by_name=False)
            if found is not None:
                if spec.resume == "never":
                    raise ConfigError(f"W&B run {spec.run_id!r} already exists in project {project!r} and "
                                      "resume='never'; pass resume='auto' to continue it, or another run_id")
                return spec.run_id, True, spec.name or found[1]
            if spec.resume == "must":
                raise CheckpointNotFound(f"no W&B run {spec.run_id!r} in project {project!r} to resume")
            return spec.run_id, False, spec.name
        if spec.name is not None and spec.resume != "never":
            found = self._lookup(entity, project, spec.name, by_name=True)
            if found is not None:
                return found[0], True, spec.name
        if spec.resume == "must":
            if spec.name is None:
                raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
            raise CheckpointNotFound(f"no W&B run named {spec.name!r} in project {project!r} to resume")
        return None, False, spec.name

    def _lookup(self, entity: str | None, project: str, wanted: str, by_name: bool) -> tuple[str, str, str] | None:
        """(run id, name, entity) of an existing run, by id or by display name (newest)."""
        if self.mode != "online":
            rdir = self._store / project / wanted
            if not by_name and (rdir / "run.json").is_file():
                meta = self._read_json(rdir / "run.json")
                return wanted, str(meta.get("name") or wanted), str(meta.get("entity") or "")
            named = sorted((m.get("created", ""), d.name, m) for d, m in self._store_runs(project)
                           if m.get("name") == wanted)
            return (named[-1][1], wanted, str(named[-1][2].get("entity") or "")) if named else None
        from wandb.apis.public.runs import RunNotFoundError

        api = self._api()
        with self._errors(f"looking up W&B run {wanted!r}"):
            if not by_name:
                try:
                    r = api.run(f"{entity}/{project}/{wanted}")
                except RunNotFoundError:
                    return None
                return str(r.id), str(r.name or r.id), str(r.entity)
            try:
                for r in api.runs(f"{entity}/{project}", filters={"displayName": wanted}, order="-created_at"):
                    return str(r.id), str(r.name or r.id), str(r.entity)
            except ValueError as exc:  # how the SDK says the project has no runs yet
                if "Could not find project" not in str(exc):
                    raise
        return None

    def _init(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, resumed: bool) -> Any:
        import wandb

        kwargs: dict[str, Any] = {"entity": entity, "project": project, "id": run_id, "name": spec.name,
                                  "config": dict(spec.config) or None, "dir": str(self.dir), "mode": self.mode,
                                  "reinit": "create_new"}  # several runs may be open in one process
        if resumed:
            kwargs.update(resume="must" if self.mode == "online" else "allow", allow_val_change=True)
        elif run_id is not None and self.mode == "online":
            kwargs["resume"] = "never"
        if self.base_url:
            kwargs["settings"] = wandb.Settings(base_url=self.base_url)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._errors(f"starting W&B run in project {project!r} ({self.mode})"):
            live = wandb.init(**kwargs)
            live.define_metric(f"{_METRIC}step")
            live.define_metric(f"{_METRIC}*", step_metric=f"{_METRIC}step")
        return live

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) not in (2, 3):
            raise InvalidRef(f"{ref}: a W&B reference names [entity/]project/run: wandb://<entity>/<project>/<run id>")
        entity, project, wanted = (None, *segs) if len(segs) == 2 else segs
        if self.mode == "online":
            entity = entity or self._default_entity()
        found = self._lookup(entity, project, wanted, by_name=False) or self._lookup(entity, project, wanted, True)
        if found is None or (entity and found[2] and found[2] != entity):
            where = f"under {self._store}" if self.mode != "online" else f"on {self._where}"
            hint = "" if self.mode == "online" else " (offline: only runs written on this machine; synced runs " \
                                                    "are read with mode = \"online\")"
            raise CheckpointNotFound(f"no W&B run {wanted!r} in project {'/'.join(filter(None, (entity, project)))}"
                                     f" {where}{hint}")
        run_id, name, found_entity = found
        return self._info(found_entity or None, project, run_id, name, resumed=True)

    # -- checkpoints --------------------------------------------------------------------
    @staticmethod
    def _metadata(ckpt: LocalCheckpoint) -> dict[str, Any]:
        m = ckpt.manifest
        return {"step": m.step, "epoch": m.epoch, "metrics": dict(m.metrics), "created": m.created,
                "size": m.size, "lineage": dict(m.lineage), "format_version": m.format_version,
                "manifest_xxh3": hash_file(ckpt.path / MANIFEST)}

    def _stored(self, run: RunInfo, version: int, meta: Mapping[str, Any], aliases: Sequence[str],
                **native: Any) -> Stored:
        return Stored(ref=run.ref.select(version=version), run=run, version=version, step=int(meta["step"]),
                      epoch=None if meta.get("epoch") is None else int(meta["epoch"]),
                      aliases=tuple(sorted(aliases)),
                      metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
                      size=int(meta.get("size") or 0), created=str(meta.get("created") or ""),
                      lineage=dict(meta.get("lineage") or {}),
                      native={"artifact": self._artifact_path(run, version),
                              "manifest_xxh3": meta.get("manifest_xxh3"), **native})

    def _live_run(self, run: RunInfo) -> Any:
        live = self._live(run.project, run.run_id)
        if live is None:
            raise BackendError(f"{run.ref}: checkpoints can only be logged to a W&B run opened in this process "
                               "(ckpt_track.init); it is not open or already finished")
        return live

    def _log(self, live: Any, run: RunInfo, src: Path, ckpt: LocalCheckpoint, aliases: list[str],
             meta: dict[str, Any]) -> tuple[Any, dict[str, int]]:
        """Log the artifact and the history row; returns the logged artifact and the size of
        each of its files by MD5 digest (as the SDK computed it)."""
        import wandb

        with self._errors(f"logging the checkpoint at step {ckpt.step} to W&B"):
            art = wandb.Artifact(f"{ARTIFACT_PREFIX}{run.run_id}", type="model", metadata=meta)
            for fname in [*sorted(ckpt.manifest.files), MANIFEST]:
                # immutable: W&B hashes and uploads the file in place instead of copying it to staging
                art.add_file(str(src / fname), name=fname, policy="immutable", skip_cache=True)
            files = {str(e.digest): int(e.size or 0) for e in art.manifest.entries.values()}
            logged = live.log_artifact(art, aliases=aliases)
            if self.mode == "online":
                logged = logged.wait()  # the server numbers the version once every file is uploaded
            row = {f"{_METRIC}step": ckpt.step, **{f"{_METRIC}{k}": v for k, v in ckpt.manifest.metrics.items()}}
            if ckpt.manifest.epoch is not None:
                row[f"{_METRIC}epoch"] = ckpt.manifest.epoch
            live.log(row)
            if self.registry and "best" in aliases:
                self._link(live, logged)
        return logged, files

    def _link(self, live: Any, artifact: Any) -> None:
        if self.mode != "online":
            return  # link_artifact needs the server (NotImplementedError offline); link after `wandb sync`
        live.link_artifact(artifact, target_path=self.registry, aliases=["best"])

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        names = sorted(set(aliases))
        meta = self._metadata(ckpt)
        if self.mode == "online":
            live = self._live_run(run)
            held = self._held_digests(run)  # before logging: afterwards `latest` is this version
            logged, files = self._log(live, run, ckpt.path, ckpt, names, meta)
            stored = self._stored(run, int(str(logged.version).lstrip("v")) + 1, meta, names)
            return replace(stored, uploaded=sum(size for digest, size in files.items() if digest not in held))
        live = self._live_run(run) if self.mode == "offline" else None
        rdir = self._store / run.project / run.run_id
        sources, uploaded = self._against_newest(rdir, ckpt)
        try:
            incoming = copy_checkpoint(ckpt, rdir / ".incoming", uuid.uuid4().hex, sources=sources)
        except FileNotFoundError:
            if not sources:
                raise
            incoming = copy_checkpoint(ckpt, rdir / ".incoming", uuid.uuid4().hex)  # previous one deleted meanwhile
        with self._locked(rdir):
            table = self._read_json(rdir / "run.json")
            version = int(table.get("next_version", 1))
            final = rdir / f"v{version:06d}"
            os.rename(incoming.path, final)
            try:
                if live is not None:  # the record log points at the store's files, so sync uploads them
                    self._log(live, run, final, LocalCheckpoint(final, ckpt.manifest), names, meta)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            table["next_version"] = version + 1
            table["versions"] = [*table.get("versions", []), version]
            table["aliases"] = {**table.get("aliases", {}), **dict.fromkeys(names, version)}
            self._write_json(rdir / "run.json", table)
        return replace(self._stored(run, version, meta, names, path=str(final)), uploaded=uploaded)

    def _held_digests(self, run: RunInfo) -> set[str]:
        """MD5 digests of the files of the run's newest artifact version (``latest``): the
        files W&B will not upload again."""
        name = self._artifact_path(run, "latest")
        try:
            with self._errors(f"reading the manifest of {name}"):
                return {str(e.digest) for e in self._api().artifact(name).manifest.entries.values()}
        except CheckpointNotFound:
            return set()  # the run's first checkpoint

    def list(self, run: RunInfo) -> list[Stored]:
        if self.mode != "online":
            return self._store_list(run)
        name = f"{ARTIFACT_PREFIX}{run.run_id}"
        out = []
        with self._errors(f"listing the checkpoints of {run.ref}"):
            remote = self._api().run(f"{run.native['entity']}/{run.project}/{run.run_id}")
            for art in remote.logged_artifacts():
                collection, _, index = str(art.name).partition(":")
                meta = art.metadata or {}
                if art.type != "model" or collection != name or "step" not in meta:
                    continue  # another artifact of the run, or not one of ours
                out.append(self._stored(run, int(index.lstrip("v")) + 1, meta, list(art.aliases)))
        return sorted(out, key=lambda s: s.version)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        if "path" in stored.native:  # offline store: already on local disk
            path = Path(stored.native["path"])
            return LocalCheckpoint(path, read_manifest(path))
        dest = Path(dest)
        expected = stored.native.get("manifest_xxh3")
        if (dest / MANIFEST).is_file():
            try:
                # the manifest hash tells this version from another one cached under the same path
                if expected in (None, hash_file(dest / MANIFEST)):
                    return LocalCheckpoint(dest, verify(dest))
            except (IntegrityError, CheckpointNotFound, OSError):
                pass  # damaged, partial or another checkpoint: download again
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            with self._errors(f"downloading {stored.native['artifact']}"):
                self._api().artifact(stored.native["artifact"]).download(root=str(tmp), skip_cache=True)
            manifest = read_manifest(tmp)
            if dest.exists():
                trash = dest.with_name(f".deleting-{dest.name}-{uuid.uuid4().hex[:8]}")
                os.rename(dest, trash)
                shutil.rmtree(trash, ignore_errors=True)
            publish(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return LocalCheckpoint(dest, manifest)

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        if self.mode != "online":
            rdir = self._store / stored.run.project / stored.run.run_id
            with self._locked(rdir):
                table = self._read_json(rdir / "run.json")
                table["aliases"] = {**table.get("aliases", {}), **dict.fromkeys(aliases, stored.version)}
                self._write_json(rdir / "run.json", table)
            return
        with self._errors(f"setting aliases {sorted(aliases)} on {stored.native['artifact']}"):
            art = self._api().artifact(stored.native["artifact"])
            art.aliases = sorted(set(art.aliases) | set(aliases))
            art.save()  # W&B moves each alias off the version that held it
            live = self._live(stored.run.project, stored.run.run_id)
            if self.registry and "best" in aliases and live is not None:
                self._link(live, art)

    def delete(self, stored: Stored) -> None:
        if self.mode == "online":
            with self._errors(f"deleting {stored.native['artifact']}"):
                self._api().artifact(stored.native["artifact"]).delete(delete_aliases=True)
            return
        rdir = self._store / stored.run.project / stored.run.run_id
        with self._locked(rdir):
            table = self._read_json(rdir / "run.json")
            table["versions"] = [v for v in table.get("versions", []) if v != stored.version]
            table["aliases"] = {a: v for a, v in table.get("aliases", {}).items() if v != stored.version}
            self._write_json(rdir / "run.json", table)
            path = rdir / f"v{stored.version:06d}"
            if not path.exists():
                return
            trash = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        live = self._live(run.project, run.run_id)
        record = {"resumed_from": str(source.ref), "resumed_from_artifact": source.native.get("artifact", "")}
        if live is not None:
            with self._errors(f"recording in W&B that {run.ref} resumes from {source.ref}"):
                if self.mode == "online":
                    live.use_artifact(source.native["artifact"])  # an edge in W&B's lineage graph
                live.config.update({"ckpt_track": record}, allow_val_change=True)
        if self.mode != "online":
            rdir = self._store / run.project / run.run_id
            with self._locked(rdir):
                table = self._read_json(rdir / "run.json")
                table["inputs"] = [*table.get("inputs", []), record]
                self._write_json(rdir / "run.json", table)

    def finish_run(self, run: RunInfo) -> None:
        live = self._release(run.project, run.run_id)
        if live is not None:
            with self._errors(f"finishing W&B run {run.ref}"):
                live.finish()

    def close(self) -> None:
        """Finish every W&B run this instance opened and did not finish (e.g. in a notebook)."""
        for *_, project, run_id in list(self._opened):
            self.finish_run(RunInfo(self.name, project, run_id, run_id, Ref(self.name, f"{project}/{run_id}")))

    # -- the offline store ------------------------------------------------------------------
    @property
    def _store(self) -> Path:
        return self.dir / "wandb" / "ckpt_track"

    @contextmanager
    def _locked(self, rdir: Path) -> Iterator[None]:
        rdir.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(rdir / ".lock"), timeout=_LOCK_TIMEOUT_S):
                yield
        except Timeout as exc:
            raise BackendUnavailable(f"could not lock {rdir} within {_LOCK_TIMEOUT_S:.0f} s; another process "
                                     f"holds {rdir / '.lock'}") from exc

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{path} is damaged: {exc}") from exc

    @staticmethod
    def _write_json(path: Path, data: Mapping[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _against_newest(self, rdir: Path, ckpt: LocalCheckpoint) -> tuple[dict[str, Path], int]:
        """``ckpt`` against the run's newest stored version (what W&B holds before it, once
        synced): that version's copies of the unchanged tensor files, to hard-link (stored once
        on disk; each version stays whole, so deleting one never touches another), and the
        bytes of the files whose contents it lacks (what W&B uploads: it dedups by digest)."""
        new = ckpt.manifest
        uploaded = (ckpt.path / MANIFEST).stat().st_size + sum(e.size for e in new.files.values())
        versions = self._read_json(rdir / "run.json").get("versions", [])
        if not versions:
            return {}, uploaded
        path = rdir / f"v{versions[-1]:06d}"
        try:
            old = read_manifest(path)
        except (CheckpointNotFound, IntegrityError):
            return {}, uploaded  # being deleted, or damaged
        held = {(e.hash, e.size) for e in old.files.values()} if old.hash_algorithm == new.hash_algorithm else set()
        uploaded -= sum(e.size for e in new.files.values() if (e.hash, e.size) in held)
        return {f: path / f for f in new.files if is_blob(f) and f in old.files}, uploaded

    def _store_runs(self, project: str) -> list[tuple[Path, dict[str, Any]]]:
        pdir = self._store / project
        if not pdir.is_dir():
            return []
        return [(d, self._read_json(d / "run.json")) for d in pdir.iterdir() if (d / "run.json").is_file()]

    def _store_run(self, project: str, run_id: str, entity: str | None, name: str | None,
                   config: Mapping[str, Any]) -> None:
        rdir = self._store / project / run_id
        with self._locked(rdir):
            table = self._read_json(rdir / "run.json")
            if not table:
                table = {"run_id": run_id, "project": project, "created": _now(), "config": dict(config),
                         "next_version": 1, "versions": [], "aliases": {}}
            table.update(name=name or table.get("name") or run_id, entity=entity or table.get("entity") or "",
                         mode=self.mode)
            self._write_json(rdir / "run.json", table)

    def _store_list(self, run: RunInfo) -> list[Stored]:
        rdir = self._store / run.project / run.run_id
        table = self._read_json(rdir / "run.json")
        aliases = table.get("aliases", {})
        out = []
        for version in sorted(table.get("versions", [])):
            path = rdir / f"v{version:06d}"
            try:
                m = read_manifest(path)
            except CheckpointNotFound:
                continue  # being deleted
            meta = {"step": m.step, "epoch": m.epoch, "metrics": m.metrics, "created": m.created,
                    "size": m.size, "lineage": m.lineage}
            out.append(self._stored(run, version, meta, [a for a, v in aliases.items() if v == version],
                                    path=str(path)))
        return out

    # -- references ---------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        text = text.strip()
        if text.startswith("wandb://"):
            try:
                return Ref.parse(text)
            except InvalidRef:
                return None
        params: dict[str, str] = {}
        if text.startswith("wandb-artifact://"):
            rest = text[len("wandb-artifact://"):]
            if rest.startswith(("http://", "https://")):  # the SDK's form with a server prefix
                url = urlsplit(rest)
                url.port  # noqa: B018 -- ValueError for a bad port, InvalidRef at refs.parse_ref
                params["base_url"] = f"{url.scheme}://{url.netloc}"
                rest = url.path
            m = _NATIVE.match(rest.strip("/"))
            if m is None:
                raise InvalidRef(f"{text!r}: expected wandb-artifact://<entity>/<project>/ckpt-<run id>:v<N>")
            return _artifact_ref(m["entity"], m["project"], m["name"], m["sel"], params, text)
        if text.startswith(("http://", "https://")):
            return _parse_url(text)
        m = _NATIVE.match(text)
        if m is None or not m["name"].startswith(ARTIFACT_PREFIX):
            return None
        return _artifact_ref(m["entity"], m["project"], m["name"], m["sel"], params, text)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return (
            "wandb://[<entity>/]<project>/<run id>[@latest|@best|@step=N|:vN][?base_url=https://your-server]",
            "[<entity>/]<project>/ckpt-<run id>:v<K> | :<alias>   (W&B artifact; W&B v0 is ckpt_track :v1)",
            "https://wandb.ai/<entity>/<project>/runs/<run id>   (also forge.coreweave.com/wandb/..., self-hosted)",
            "https://wandb.ai/<entity>/<project>/artifacts/model/ckpt-<run id>/v<K>",
        )


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status somewhere in an SDK error's chain (wandb-core reports it on ``response``)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        response = getattr(e, "response", None)
        status = getattr(response, "http_status", None) or getattr(response, "status_code", None)
        if isinstance(status, int) and status:
            return status
        inner = getattr(e, "exc", None)
        todo.extend([e.__cause__, e.__context__, inner if isinstance(inner, BaseException) else None])
    return None
