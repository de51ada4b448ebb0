"""The ``comet`` backend: checkpoints as models of a Comet experiment.

A run is a Comet experiment.  Checkpoint version N is the experiment model
``ckpt-v<N>-step<S>``: one model per checkpoint, so the UI's Models tab,
``APIExperiment.get_model_asset_list(name)`` and ``download_model(name)`` each
address exactly one checkpoint (one model name per run would mix the files of
every step under one name).  Every file is a model element carrying the same
metadata: version, step, epoch, metrics, the aliases it got when logged,
lineage, and the size of each file (so a half-uploaded model is never listed).
Metrics also go to the experiment with ``log_metrics(step=)``.

Comet models have no aliases, so the alias table, the highest version ever used
and deleted versions live in one experiment "other", ``ckpt_track.state``
(JSON); others are the one per-experiment value that is mutable online and
recorded offline.  Resume lineage is the other ``ckpt_track.resumed_from``.

Online (default): ``Experiment`` / ``ExistingExperiment`` write, ``API`` reads
(``COMET_API_KEY``; ``url`` or ``COMET_URL_OVERRIDE`` for a self-hosted server).
Offline (``online = false``): ``OfflineExperiment`` writes ``<key>.zip`` for
``comet upload``, and each checkpoint is also kept (hard-linked where possible)
at ``<offline_directory>/ckpt_track/<key>/v<N>/``, so it can be restored by any
process, also after a crash that never wrote the zip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from filelock import FileLock

from ..errors import (AuthError, BackendError, BackendNotInstalled, BackendUnavailable, CheckpointNotFound,
                      CkptTrackError, ConfigError, IntegrityError, InvalidRef)
from ..format import MANIFEST, LocalCheckpoint, copy_checkpoint, read_manifest, verify
from ..refs import Ref
from .base import RunInfo, RunSpec, Stored

__all__ = ["CometBackend", "model_name"]

STATE_KEY = "ckpt_track.state"
RUN_ID_KEY = "ckpt_track.run_id"
RESUMED_FROM_KEY = "ckpt_track.resumed_from"
_KEY = re.compile(r"^[A-Za-z0-9]{32,50}$")  # what comet_ml accepts as an experiment key
_MODEL = re.compile(r"^ckpt-v(\d+)-step(\d+)$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SAAS_HOSTS = frozenset({"comet.com", "www.comet.com", "comet.ml", "www.comet.ml"})
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_ours: weakref.WeakSet[Any] = weakref.WeakSet()  # experiments this module started (vs. the user's own)


def model_name(version: int, step: int) -> str:
    """The Comet model name of checkpoint version ``version`` logged at ``step``."""
    return f"ckpt-v{version}-step{step}"


@dataclass
class _State:
    """The ``ckpt_track.state`` other: aliases, the version high-water mark, tombstones."""

    aliases: dict[str, int] = field(default_factory=dict)
    last_version: int = 0
    deleted: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, text: Any, where: str) -> _State:
        if not text:
            return cls()
        try:
            d = json.loads(text) if isinstance(text, (str, bytes)) else dict(text)
            return cls({str(k): int(v) for k, v in d.get("aliases", {}).items()},
                       int(d.get("last_version", 0)), sorted(int(v) for v in d.get("deleted", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where}: {STATE_KEY!r} is damaged ({exc}); fix or delete it in Comet's "
                                 "Others tab (aliases are lost, checkpoints are not)") from exc

    def dump(self) -> str:
        return json.dumps({"aliases": self.aliases, "last_version": self.last_version,
                           "deleted": self.deleted}, sort_keys=True)

    def point(self, aliases: Sequence[str], version: int) -> None:
        self.aliases.update({a: version for a in aliases})
        self.last_version = max(self.last_version, version)

    def aliases_of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(a for a, v in self.aliases.items() if v == version))


@dataclass(frozen=True)
class _Found:
    key: str
    workspace: str | None
    project: str
    name: str | None
    run_id: str | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _segment(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SEGMENT.match(value):
        raise ConfigError(f"Comet {what} {value!r} may only hold letters, digits, '_', '.', '-'")
    return value


def _server_root(url: Any) -> str | None:
    """``https://comet.example.com[/clientlib/]`` -> ``https://comet.example.com``."""
    if not url:
        return None
    u = urlparse(str(url))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"[comet] url {url!r} must look like https://comet.example.com (the server root)")
    path = re.sub(r"/clientlib/?$", "", u.path.rstrip("/"))
    return f"{u.scheme}://{u.netloc}{path}"


def _meta(assets: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Our metadata from any element of a model (Comet returns it as a JSON string)."""
    for a in assets:
        raw = a.get("metadata")
        try:
            meta = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            continue
        if isinstance(meta, dict) and "ckpt_track" in meta:
            return meta
    return None


def _semver(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version)[:3])


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class CometBackend:
    """Checkpoints as Comet experiment models, online or offline.  See the module docstring."""

    name: ClassVar[str] = "comet"
    options: ClassVar[frozenset[str]] = frozenset(
        {"workspace", "project", "online", "offline_directory", "url", "register_as"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - self.options
        if unknown:
            raise ConfigError(f"comet backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        self.workspace = None if options.get("workspace") is None else _segment(options["workspace"], "workspace")
        self.project = None if options.get("project") is None else _segment(options["project"], "project")
        online = options.get("online", True)
        if isinstance(online, str) and online.strip().lower() in _BOOLS:
            online = _BOOLS[online.strip().lower()]
        if not isinstance(online, bool):
            raise ConfigError(f"[comet] online must be true or false, got {online!r}")
        self.online = online
        self.url = _server_root(options.get("url"))
        self.register_as = options.get("register_as") or None
        root = options.get("offline_directory") or os.environ.get("COMET_OFFLINE_DIRECTORY") or ".cometml-runs"
        self.offline_directory = Path(root).expanduser().absolute()
        self._open: dict[str, tuple[Any, bool]] = {}  # key -> (experiment, owned by us)
        self._states: dict[str, _State] = {}
        self._models: dict[tuple[str, str], list[dict[str, Any]]] = {}  # complete models never change
        self._api_exps: dict[str, Any] = {}
        self._api_obj: Any = None
        self._lock = threading.RLock()

    # -- the SDK boundary -----------------------------------------------------------
    def _sdk(self) -> Any:
        try:
            import comet_ml
        except ImportError as exc:
            raise BackendNotInstalled("comet", "comet", "comet_ml") from exc
        if self.url:  # comet_ml reads the server from the environment only
            os.environ["COMET_URL_OVERRIDE"] = f"{self.url}/clientlib/"
        return comet_ml

    def _where(self) -> str:
        return f"Comet at {self.url or os.environ.get('COMET_URL_OVERRIDE') or 'https://www.comet.com'}"

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turn comet_ml / requests errors into ckpt_track's, chaining the original."""
        try:
            yield
        except CkptTrackError:
            raise
        except Exception as exc:
            raise self._map(exc, what) from exc

    def _map(self, exc: Exception, what: str) -> CkptTrackError:
        import requests
        from comet_ml import exceptions as cx

        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, (cx.InvalidAPIKey, cx.Unauthorized, cx.AuthenticationError)) or status in (401, 403):
            return AuthError(f"{self._where()} rejected the API key while {what}: set COMET_API_KEY to a valid "
                             "key (Comet → Account Settings → API Keys)")
        if isinstance(exc, (cx.InvalidWorkspace, cx.ServiceAccountWorkspaceRestricted, cx.ViewOnlyAccessException)):
            return ConfigError(f"{what}: {exc}; check [comet] workspace and your access to it")
        if isinstance(exc, cx.NotFound) or status == 404:
            return CheckpointNotFound(f"{what}: {self._where()} has no such object ({exc})")
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)) or (status or 0) >= 500:
            return BackendUnavailable(f"cannot reach {self._where()} while {what} ({exc}); check the network and "
                                      "[comet] url, or set [comet] online = false and `comet upload` later")
        return BackendError(f"Comet failed while {what}: {type(exc).__name__}: {exc}")

    def _require_key(self, comet_ml: Any) -> None:
        if comet_ml.config.get_api_key(None, comet_ml.config.get_config()) is None:
            raise AuthError("Comet needs an API key to work online: set COMET_API_KEY (or run `comet login`), "
                            "or set [comet] online = false to log offline and `comet upload` later")

    def _api(self) -> Any:
        if self._api_obj is None:
            comet_ml = self._sdk()
            self._require_key(comet_ml)
            with self._calling("connecting to the REST API"):
                self._api_obj = comet_ml.API(cache=False)  # cached reads would hide our own writes
        return self._api_obj

    def _api_exp(self, key: str) -> Any:
        if key not in self._api_exps:
            with self._calling(f"looking up experiment {key}"):
                found = self._api().get_experiment_by_key(key)
            if found is None:
                raise CheckpointNotFound(f"no Comet experiment {key} on {self._where()} (or no access to it)")
            self._api_exps[key] = found
        return self._api_exps[key]

    def _ws_for_reads(self) -> str:
        if self.workspace:
            return self.workspace
        with self._calling("reading the default workspace"):
            return str(self._api().get_default_workspace())

    # -- runs -----------------------------------------------------------------------------
    def _mirror(self, key: str) -> Path:
        return self.offline_directory / "ckpt_track" / key

    def _run_lock(self, key: str) -> Any:
        if self.online:
            return nullcontext()
        self._mirror(key).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._mirror(key) / ".lock"), timeout=120)

    def _derive_key(self, project: str, run_id: str) -> str:
        """A user's run id as an experiment key, the same in every process (Comet keys are global)."""
        if _KEY.match(run_id):
            return run_id
        return hashlib.sha256(f"ckpt_track/{self.workspace or ''}/{project}/{run_id}".encode()).hexdigest()[:32]

    def _info(self, f: _Found, resumed: bool) -> RunInfo:
        segs = [s for s in (f.workspace, f.project, f.key) if s]
        path = "/".join(segs) if all(_SEGMENT.match(s) for s in segs) else f.key
        ref = Ref(self.name, path, params=(("url", self.url),) if self.url else ())
        return RunInfo(backend=self.name, project=f.project, run_id=f.run_id or f.key, name=f.name or f.run_id or f.key,
                       ref=ref, resumed=resumed, native={"key": f.key, "workspace": f.workspace})

    def _lookup(self, project: str | None, wanted: str) -> _Found | None:
        """An existing experiment by key, by a ckpt_track run id, or by name (latest)."""
        keys = [wanted] if _KEY.match(wanted) else []
        if project is not None:
            keys.append(self._derive_key(project, wanted))
        for key in keys:
            found = self._by_key(key)
            if found is not None:
                return found
        return self._by_name(project, wanted) if project is not None else None

    def _by_key(self, key: str) -> _Found | None:
        if not self.online:
            meta = self._mirror_meta(key)
            return None if meta is None else _Found(key, meta.get("workspace"), meta["project"], meta.get("name"),
                                                    meta.get("run_id"))
        with self._calling(f"looking up experiment {key}"):
            exp = self._api().get_experiment_by_key(key)
            if exp is None:
                return None
            others = {o["name"]: o.get("valueCurrent") for o in exp.get_others_summary() or []}
        self._api_exps[key] = exp
        if key not in self._states:
            self._states[key] = _State.load(others.get(STATE_KEY), f"experiment {key}")
        return _Found(key, exp.workspace, exp.project_name, exp.name, others.get(RUN_ID_KEY))

    def _by_name(self, project: str, name: str) -> _Found | None:
        if not self.online:
            root = self.offline_directory / "ckpt_track"
            metas = [m for d in (root.iterdir() if root.is_dir() else []) if (m := self._mirror_meta(d.name))]
            hits = sorted((m for m in metas if m["project"] == project and m.get("name") == name),
                          key=lambda m: str(m.get("created", "")))
            return self._by_key(hits[-1]["key"]) if hits else None
        ws = self._ws_for_reads()
        with self._calling(f"looking up experiment {name!r} in {ws}/{project}"):
            exp = self._api().get_experiment(ws, project, name)  # by key, then by name
        return None if exp is None else self._by_key(exp.id)

    def _mirror_meta(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._mirror(key) / "run.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise IntegrityError(f"{self._mirror(key) / 'run.json'} is damaged: {exc}") from exc

    def _not_found(self, wanted: str, project: str | None) -> CheckpointNotFound:
        where = (f"online on {self._where()}" if self.online
                 else f"in the offline store {self.offline_directory / 'ckpt_track'}")
        hint = "; set [comet] online = false to read offline runs" if self.online else ""
        return CheckpointNotFound(f"no Comet experiment {wanted!r} in project {project!r} {where}{hint}")

    def open_run(self, spec: RunSpec) -> RunInfo:
        project = _segment(self.project or spec.project, "project")
        comet_ml = self._sdk()
        if self.online:
            self._require_key(comet_ml)
        running = comet_ml.get_running_experiment()
        if running is not None and running.alive and not running.ended and running not in _ours:
            return self._adopt(comet_ml, running, spec, project)
        found = None
        if spec.run_id is not None:
            _segment(spec.run_id, "run id")
            found = self._lookup(project, spec.run_id)
            if found is not None and spec.resume == "never":
                raise ConfigError(f"run {spec.run_id!r} already exists in Comet project {project!r} and "
                                  "resume='never'; pass resume='auto' to continue it, or another run_id")
        elif spec.name is not None and spec.resume != "never":
            found = self._by_name(project, spec.name)
        if found is None and spec.resume == "must":
            if spec.run_id is None and spec.name is None:
                raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
            raise self._not_found(str(spec.run_id or spec.name), project)
        existing = found is not None
        if found is None:
            key = self._derive_key(project, spec.run_id) if spec.run_id else uuid.uuid4().hex
            found = _Found(key, self.workspace, project, spec.name or spec.run_id, spec.run_id)
        self._start(found, create=not existing, config=spec.config)
        return self._info(found, resumed=existing)
