"""The ``comet`` backend: checkpoints as models of a Comet experiment.

A run is an experiment; checkpoint version N is the experiment model
``ckpt-v<N>-step<S>``.  One model per checkpoint lets the Models tab,
``get_model_asset_list(name)`` and ``download_model(name)`` address exactly one
checkpoint (one name per run would mix every step's files).  Each file is a
model element carrying the same metadata: version, step, epoch, metrics, the
aliases it got, lineage and every file's size (a half-uploaded model is never
listed).  Content-addressed tensor files (``format.is_blob``) are not model
elements but experiment assets ``ckpt_track/blobs/<file>``, logged once per
experiment and shared by every checkpoint that names them (metadata ``blobs``).
Metrics also go to ``log_metrics(step=)``.  Comet models have no aliases, so
the alias table, the highest version used and deleted versions live in the
experiment "other" ``ckpt_track.state``; resume lineage in ``ckpt_track.resumed_from``.

Online: ``Experiment`` writes, ``API`` reads.  Offline (``online = false``):
``OfflineExperiment`` writes ``<key>.zip`` for ``comet upload``, and every
checkpoint is also kept in ``<offline_directory>/ckpt_track/<key>/v<N>/`` so any
process can restore it at once, also after a crash that never wrote the zip.
See ``backends/comet.md``.
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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from filelock import FileLock

from ..errors import (
    AuthError,
    BackendError,
    BackendNotInstalled,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from ..format import MANIFEST, LocalCheckpoint, copy_checkpoint, is_blob, link_cached, read_manifest, verify
from ..refs import Ref
from ..records import RunInfo, RunSpec, Stored
from ..boundary import sdk_errors

__all__ = ["BLOB_PREFIX", "CometBackend", "model_name"]

STATE_KEY = "ckpt_track.state"
RUN_ID_KEY = "ckpt_track.run_id"
RESUMED_FROM_KEY = "ckpt_track.resumed_from"
BLOB_PREFIX = "ckpt_track/blobs/"  # experiment asset name of a content-addressed tensor file
_KEY = re.compile(r"^[A-Za-z0-9]{32,50}$")  # what comet_ml accepts as an experiment key
_MODEL = re.compile(r"^ckpt-v(\d+)-step(\d+)$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
_REGISTRY_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SAAS_HOSTS = frozenset({"comet.com", "www.comet.com", "comet.ml", "www.comet.ml"})
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_ours: weakref.WeakSet[Any] = weakref.WeakSet()  # experiments ckpt_track started, as opposed to the user's


def model_name(version: int, step: int) -> str:
    """The Comet model name of checkpoint ``version`` logged at ``step``."""
    return f"ckpt-v{version}-step{step}"


@dataclass
class _State:
    """The ``ckpt_track.state`` other: alias table, version high-water mark, tombstones."""

    aliases: dict[str, int] = field(default_factory=dict)
    last_version: int = 0
    deleted: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, text: Any, where: str) -> _State:
        if not text:
            return cls()
        try:
            d = json.loads(text)
            return cls({str(k): int(v) for k, v in d.get("aliases", {}).items()},
                       int(d.get("last_version", 0)), sorted(int(v) for v in d.get("deleted", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where}: {STATE_KEY!r} is damaged ({exc}); fix or delete it in Comet's "
                                 "Others tab (aliases are lost, checkpoints are not)") from exc

    def dump(self) -> str:
        return json.dumps({"aliases": self.aliases, "last_version": self.last_version, "deleted": self.deleted},
                          sort_keys=True)

    def point(self, aliases: Sequence[str], version: int) -> _State:
        return _State({**self.aliases, **{a: version for a in aliases}}, max(self.last_version, version),
                      list(self.deleted))

    def aliases_of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(a for a, v in self.aliases.items() if v == version))


@dataclass(frozen=True)
class _Found:
    key: str
    workspace: str | None
    project: str
    name: str | None
    run_id: str | None


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
    return f"{u.scheme}://{u.netloc}{re.sub(r'/clientlib/?$', '', u.path.rstrip('/'))}"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class CometBackend:
    """Checkpoints as Comet experiment models, online or offline (see the module docstring)."""

    name: ClassVar[str] = "comet"
    options: ClassVar[frozenset[str]] = frozenset(
        {"workspace", "project", "online", "offline_directory", "url", "register_as"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete", "dedup"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - self.options
        if unknown:
            raise ConfigError(f"comet backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        self.workspace = None if options.get("workspace") is None else _segment(options["workspace"], "workspace")
        self.project = None if options.get("project") is None else _segment(options["project"], "project")
        online = options.get("online", True)
        online = _BOOLS.get(online.strip().lower(), online) if isinstance(online, str) else online
        if not isinstance(online, bool):
            raise ConfigError(f"[comet] online must be true or false, got {online!r}")
        self.online = online
        self.url = _server_root(options.get("url"))
        self.register_as = options.get("register_as") or None
        if self.register_as is not None and not _REGISTRY_NAME.match(str(self.register_as)):
            raise ConfigError(f"[comet] register_as {self.register_as!r}: Comet registry names are lowercase "
                              "letters and digits joined by single '-', e.g. 'resnet-ckpt'")
        root = options.get("offline_directory") or os.environ.get("COMET_OFFLINE_DIRECTORY") or ".cometml-runs"
        self.offline_directory = Path(root).expanduser().absolute()
        self._open: dict[str, tuple[Any, bool]] = {}  # key -> (experiment, started by us)
        self._states: dict[str, _State] = {}  # online; we are the experiment's only writer
        self._models: dict[tuple[str, str], list[dict[str, Any]]] = {}  # complete models never change
        # blob -> size the experiment holds (online: on the server; offline: in this session's zip)
        self._held: dict[str, dict[str, int]] = {}
        self._api_exps: dict[str, Any] = {}
        self._api_obj: Any = None
        self._lock = threading.RLock()

    # -- the SDK boundary -----------------------------------------------------------------
    def _sdk(self) -> Any:
        import sys

        from ..network import keep_random

        try:
            # `import comet_ml` draws random.random() to sample error tracking: not from the training's generator
            with keep_random() if "comet_ml" not in sys.modules else nullcontext():
                import comet_ml
        except ImportError as exc:
            raise BackendNotInstalled("comet", "comet", "comet_ml") from exc
        if self.url:  # comet_ml reads its server from the environment only
            os.environ["COMET_URL_OVERRIDE"] = f"{self.url}/clientlib/"
        return comet_ml

    def _where(self) -> str:
        return f"Comet at {self.url or os.environ.get('COMET_URL_OVERRIDE') or 'https://www.comet.com'}"

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turn comet_ml and requests errors into ckpt_track's, chaining the original."""
        with sdk_errors(self._map, what):
            yield

    def _map(self, exc: Exception, what: str) -> CkptTrackError:
        import requests
        from comet_ml import exceptions as cx

        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, (cx.InvalidAPIKey, cx.Unauthorized, cx.AuthenticationError)) or status in (401, 403):
            return AuthError(f"{self._where()} rejected the API key while {what}: set COMET_API_KEY to a valid "
                             "key (Comet: Account Settings, API Keys)")
        if isinstance(exc, (cx.InvalidWorkspace, cx.ServiceAccountWorkspaceRestricted, cx.ViewOnlyAccessException)):
            return ConfigError(f"{what}: {exc}; check [comet] workspace and your access to it")
        if isinstance(exc, cx.NotFound) or status == 404:
            return CheckpointNotFound(f"{what}: {self._where()} has no such object ({exc})")
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)) or (status or 0) >= 500:
            return BackendUnavailable(f"cannot reach {self._where()} while {what} ({exc}); check the network and "
                                      "[comet] url, or set [comet] online = false and `comet upload` later")
        return BackendError(f"Comet failed while {what}: {type(exc).__name__}: {exc}")

    def _api(self) -> Any:
        if self._api_obj is None:
            comet_ml = self._sdk()
            if comet_ml.config.get_api_key(None, comet_ml.config.get_config()) is None:
                raise AuthError("Comet needs an API key to work online: set COMET_API_KEY (or run `comet login`), "
                                "or set [comet] online = false to log offline and `comet upload` later")
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
        with self._calling("reading your default workspace"):
            return str(self._api().get_default_workspace())

    # -- runs ----------------------------------------------------------------------------------
    def _mirror(self, key: str) -> Path:
        return self.offline_directory / "ckpt_track" / key

    def _run_lock(self, key: str) -> Any:
        if self.online:
            return nullcontext()
        self._mirror(key).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._mirror(key) / ".lock"), timeout=120)

    def _derive_key(self, project: str, run_id: str) -> str:
        """A run id as an experiment key, the same in every process (Comet keys are global)."""
        if _KEY.match(run_id):
            return run_id
        return hashlib.sha256(f"ckpt_track/{self.workspace or ''}/{project}/{run_id}".encode()).hexdigest()[:32]

    def _info(self, f: _Found, resumed: bool) -> RunInfo:
        segs = [s for s in (f.workspace, f.project, f.key) if s]
        path = "/".join(segs) if all(_SEGMENT.match(s) for s in segs) else f.key
        ref = Ref(self.name, path, params=(("url", self.url),) if self.url else ())
        return RunInfo(backend=self.name, project=f.project, run_id=f.run_id or f.key, name=f.name or f.run_id or f.key,
                       ref=ref, resumed=resumed, native={"key": f.key, "workspace": f.workspace})

    def _lookup(self, workspace: str | None, project: str | None, wanted: str, names: bool = True) -> _Found | None:
        """An existing experiment by key, by ckpt_track run id, or (``names``) by name."""
        keys = {wanted} if _KEY.match(wanted) else set()
        if project is not None:
            keys.add(self._derive_key(project, wanted))
        for key in sorted(keys):
            if (found := self._by_key(key)) is not None:
                return found
        return self._by_name(project, wanted, workspace) if project is not None and names else None

    def _by_key(self, key: str) -> _Found | None:
        if not self.online:
            m = self._mirror_meta(key)
            return None if m is None else _Found(key, m.get("workspace"), m["project"], m.get("name"), m.get("run_id"))
        with self._calling(f"looking up experiment {key}"):
            exp = self._api().get_experiment_by_key(key)
            if exp is None:
                return None
            others = {o["name"]: o.get("valueCurrent") for o in exp.get_others_summary() or []}
        self._api_exps[key] = exp
        self._states.setdefault(key, _State.load(others.get(STATE_KEY), f"experiment {key}"))
        return _Found(key, exp.workspace, exp.project_name, exp.name, others.get(RUN_ID_KEY))

    def _by_name(self, project: str, name: str, workspace: str | None = None) -> _Found | None:
        if not self.online:
            root = self.offline_directory / "ckpt_track"
            metas = [m for d in (root.iterdir() if root.is_dir() else []) if (m := self._mirror_meta(d.name))]
            hits = [m for m in metas if m["project"] == project and m.get("name") == name]
            return self._by_key(max(hits, key=lambda m: str(m["created"]))["key"]) if hits else None
        ws = workspace or self._ws_for_reads()
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

    def _write_run_json(self, f: _Found, config: Mapping[str, Any] | None) -> None:
        with self._run_lock(f.key):
            _atomic_json(self._mirror(f.key) / "run.json", {
                "key": f.key, "workspace": f.workspace, "project": f.project, "name": f.name, "run_id": f.run_id,
                "created": datetime.now(timezone.utc).isoformat(), "config": dict(config or {})})

    def _not_found(self, wanted: str, project: str | None) -> CheckpointNotFound:
        where = f"on {self._where()}" if self.online else f"in the offline store {self.offline_directory}"
        hint = "; offline runs need [comet] online = false until uploaded" if self.online else ""
        return CheckpointNotFound(f"no Comet experiment {wanted!r} in project {project!r} {where}{hint}")

    def open_run(self, spec: RunSpec) -> RunInfo:
        project = _segment(self.project or spec.project, "project")
        comet_ml = self._sdk()
        if self.online:
            self._api()  # checks the key before anything starts
        running = comet_ml.get_running_experiment()
        if running is not None and running.alive and not running.ended and running not in _ours:
            return self._adopt(comet_ml, running, spec, project)
        found = None
        if spec.run_id is not None:
            found = self._lookup(None, project, _segment(spec.run_id, "run id"), names=False)
            if found is not None and spec.resume == "never":
                raise ConfigError(f"run {spec.run_id!r} already exists in Comet project {project!r} and "
                                  "resume='never'; pass resume='auto' to continue it, or another run_id")
        elif spec.name is not None and spec.resume != "never":
            found = self._by_name(project, spec.name)
        if found is None and spec.resume == "must":
            if spec.run_id is None and spec.name is None:
                raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
            raise self._not_found(str(spec.run_id or spec.name), project)
        if found is not None:
            return self._info(self._start(found, create=False), resumed=True)
        key = self._derive_key(project, spec.run_id) if spec.run_id else uuid.uuid4().hex
        if self.online and spec.run_id is None and spec.name is None:
            self._by_key(key)  # one REST call first, so a wrong key or a dead server fail clearly
        new = _Found(key, self.workspace, project, spec.name or spec.run_id, spec.run_id)
        return self._info(self._start(new, create=True, config=spec.config), resumed=False)

    def _start(self, f: _Found, create: bool, config: Mapping[str, Any] | None = None) -> _Found:
        """Create or re-attach the experiment this process logs to (Comet keeps one per process)."""
        comet_ml = self._sdk()
        with self._calling(f"starting experiment {f.key}"):
            if self.online:
                exp = (comet_ml.Experiment(workspace=f.workspace, project_name=f.project, experiment_key=f.key)
                       if create else comet_ml.ExistingExperiment(experiment_key=f.key))
                if not exp.alive:  # the SDK logs handshake failures instead of raising them
                    raise BackendUnavailable(f"{self._where()} did not start experiment {f.key} (see the COMET "
                                             "ERROR above); check the network, [comet] url, workspace and project")
            else:
                cls = comet_ml.OfflineExperiment if create else comet_ml.ExistingOfflineExperiment
                exp = cls(workspace=f.workspace, project_name=f.project, experiment_key=f.key,
                          offline_directory=str(self.offline_directory))
            _ours.add(exp)
            if create:
                if f.name:
                    exp.set_name(f.name)
                exp.add_tag("ckpt_track")
                if f.run_id:
                    exp.log_other(RUN_ID_KEY, f.run_id)
                if config:
                    exp.log_parameters(dict(config))
                if self.online:
                    exp.flush()  # the name must be searchable before the first checkpoint
        self._open[f.key] = (exp, True)
        self._held.pop(f.key, None)  # offline a new session writes a new zip: its blobs are logged again
        if create:
            self._held[f.key] = {}
        if create and not self.online:
            self._write_run_json(f, config)
        return replace(f, workspace=self._ws_for_reads()) if self.online and f.workspace is None else f

    def _adopt(self, comet_ml: Any, exp: Any, spec: RunSpec, project: str) -> RunInfo:
        """Log into the experiment the user started: starting another would end theirs."""
        offline = isinstance(exp, comet_ml.OfflineExperiment)
        key = exp.get_key()
        if offline == self.online:
            raise ConfigError(f"a Comet {'offline' if offline else 'online'} experiment ({key}) is running in "
                              f"this process; set [comet] online = {str(not offline).lower()} to log checkpoints "
                              "into it, or end() it before ckpt_track.init")
        if spec.run_id is not None and self._derive_key(project, spec.run_id) != key:
            raise ConfigError(f"run_id={spec.run_id!r} is not the Comet experiment {key} already running in this "
                              "process (Comet allows one); drop run_id= or end() it first")
        f = _Found(key, exp.workspace or self.workspace, exp.project_name or project, exp.name or spec.name,
                   spec.run_id)
        self._open[key] = (exp, False)
        self._held.pop(key, None)
        if offline and self._mirror_meta(key) is None:
            self._write_run_json(f, spec.config)
        if self.online and f.workspace is None:
            f = replace(f, workspace=self._ws_for_reads())
        return self._info(f, resumed=isinstance(exp, (comet_ml.ExistingExperiment, comet_ml.ExistingOfflineExperiment)))

    def _exp(self, run: RunInfo) -> Any:
        """The live experiment of ``run``, re-attached if it ended (finished, or another run started)."""
        key = run.native["key"]
        exp, ours = self._open.get(key, (None, True))
        if exp is not None and exp.alive and not exp.ended:
            return exp
        if not ours:
            raise BackendError(f"the Comet experiment {key} you started has ended; start it again before "
                               "logging more checkpoints")
        self._start(_Found(key, run.native.get("workspace"), run.project, None, None), create=False)
        return self._open[key][0]

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) == 3 and segs[0] == "registry":
            return self._registry_run(segs[1], segs[2])
        if not 1 <= len(segs) <= 3:
            raise InvalidRef(f"{ref}: a Comet reference names [<workspace>/]<project>/<experiment key or name>, "
                             "or registry/<workspace>/<model>")
        project = segs[-2] if len(segs) >= 2 else None
        with self._lock:
            found = self._lookup(segs[0] if len(segs) == 3 else None, project, segs[-1])
        if found is None:
            raise self._not_found(segs[-1], project)
        return self._info(found, resumed=True)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self, key: str) -> _State:
        if not self.online:
            try:
                return _State.load((self._mirror(key) / "state.json").read_text(), str(self._mirror(key)))
            except FileNotFoundError:
                return _State()
        if key not in self._states:
            with self._calling(f"reading {STATE_KEY} of experiment {key}"):
                values = self._api_exp(key).get_others_summary(STATE_KEY)
            self._states[key] = _State.load(values[-1] if values else None, f"experiment {key}")
        return self._states[key]

    def _save_other(self, run: RunInfo, name: str, value: str) -> None:
        """An experiment other: on the live experiment (into the zip offline), else by REST."""
        key = run.native["key"]
        exp, _ = self._open.get(key, (None, False))
        with self._calling(f"logging {name} to experiment {key}"):
            if exp is not None and exp.alive and not exp.ended:
                exp.log_other(name, value)
                if self.online and not exp.flush():
                    raise BackendUnavailable(f"{self._where()} did not take {name} of experiment {key} in time")
            elif self.online:
                self._api_exp(key).log_other(name, value)

    def _save_state(self, run: RunInfo, state: _State) -> None:
        key = run.native["key"]
        self._save_other(run, STATE_KEY, state.dump())
        if not self.online:
            _atomic_json(self._mirror(key) / "state.json", json.loads(state.dump()))
        self._states[key] = state

    def _stored(self, run: RunInfo, version: int, meta: Mapping[str, Any], aliases: Sequence[str],
                native: dict[str, Any]) -> Stored:
        return Stored(
            ref=run.ref.select(version=version), run=run, version=version, step=int(meta["step"]),
            epoch=None if meta.get("epoch") is None else int(meta["epoch"]), aliases=tuple(aliases),
            metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
            size=int(meta.get("size") or 0), created=str(meta.get("created") or ""),
            lineage=dict(meta.get("lineage") or {}), native=native)

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        key, m = run.native["key"], ckpt.manifest
        with self._lock, self._run_lock(key):
            exp = self._exp(run)
            state = self._state(key)
            version = max([state.last_version, *state.deleted, *self._versions(key)]) + 1
            name, src = model_name(version, m.step), ckpt.path
            if not self.online:  # the durable offline copy, restorable before any upload
                src = copy_checkpoint(ckpt, self._mirror(key), f"v{version:06d}").path
            files = {f: e.size for f, e in m.files.items() if not is_blob(f)}  # the model's elements
            files[MANIFEST] = (src / MANIFEST).stat().st_size
            blobs = {f: e.size for f, e in m.files.items() if is_blob(f)}
            held = self._blobs_held(key)
            new_blobs = sorted(f for f, size in blobs.items() if held.get(f) != size)
            meta = {"ckpt_track": 1, "version": version, "step": m.step, "epoch": m.epoch, "metrics": dict(m.metrics),
                    "aliases": sorted(aliases), "created": m.created, "size": m.size, "lineage": dict(m.lineage),
                    "files": files, **({"blobs": blobs} if blobs else {})}
            new_state = state.point(aliases, version)
            native: dict[str, Any] = {"model": name, "experiment": key, "shared": sorted(blobs)}
            try:
                with self._calling(f"logging checkpoint v{version} (step {m.step}) to experiment {key}"):
                    exp.set_step(m.step)
                    if m.epoch is not None:
                        exp.set_epoch(m.epoch)
                    for fname in new_blobs:  # files the experiment holds already are only named in metadata
                        exp.log_asset(str(src / fname), file_name=BLOB_PREFIX + fname)
                    for fname in sorted(files, key=lambda f: f == MANIFEST):
                        exp.log_model(name, str(src / fname), file_name=fname, metadata=meta, overwrite=False)
                    if m.metrics:
                        exp.log_metrics(dict(m.metrics), step=m.step, epoch=m.epoch)
                    if self.online:
                        native = self._uploaded(run, exp, version, name)
                    else:
                        native["path"] = str(src)
                        held.update({f: blobs[f] for f in new_blobs})
                    if self.register_as:  # only a complete model; registered by the flush below
                        exp.register_model(name, registry_name=self.register_as, version=self._next_registry(),
                                           tags=sorted(aliases), comment=str(run.ref.select(version=version)))
                    self._save_state(run, new_state)  # the aliases move only once every file is stored
            except BaseException:
                self._states.pop(key, None)
                self._held.pop(key, None)  # unsure what arrived: ask again (offline: log them again)
                if not self.online:
                    shutil.rmtree(src, ignore_errors=True)
                raise
        uploaded = sum(files.values()) + sum(blobs[f] for f in new_blobs)
        return replace(self._stored(run, version, meta, new_state.aliases_of(version), native), uploaded=uploaded)

    def _blobs_held(self, key: str) -> dict[str, int]:
        """Blob -> size of the content-addressed files the experiment already holds."""
        if key not in self._held:
            self._held[key] = {f: size for f, size, _ in self._blob_assets(key)} if self.online else {}
        return self._held[key]

    def _blob_assets(self, key: str) -> list[tuple[str, int, str]]:
        """(blob, size, asset id) of every blob asset of an experiment, duplicates included."""
        with self._calling(f"listing the assets of experiment {key}"):
            assets = self._api_exp(key).get_asset_list() or []
        out = []
        for a in assets:
            fname = str(a.get("fileName") or "")
            if fname.startswith(BLOB_PREFIX) and is_blob(fname[len(BLOB_PREFIX):]):
                out.append((fname[len(BLOB_PREFIX):], int(a.get("fileSize") or -1), str(a["assetId"])))
        return out

    def _versions(self, key: str) -> list[int]:
        """Every version number in use, also of half-uploaded models, so none is ever reused."""
        if not self.online:
            return [int(d.name[1:]) for d in self._mirror(key).glob("v[0-9]*")]
        with self._calling(f"listing the models of experiment {key}"):
            names = self._api_exp(key).get_model_names() or []
        return [int(m.group(1)) for n in names if (m := _MODEL.match(n))]

    def _uploaded(self, run: RunInfo, exp: Any, version: int, name: str) -> dict[str, Any]:
        """Wait for the upload, then check that Comet holds every file (flush() can succeed without)."""
        key = run.native["key"]
        if not exp.flush():
            raise BackendUnavailable(f"{self._where()} did not receive checkpoint {name} of experiment {key} "
                                     "in time; it is kept in the local spool")
        assets = self._api_exp(key).get_model_asset_list(name) or []
        blobs = {key: self._blob_assets(key)}
        self._held[key] = {f: size for f, size, _ in blobs[key]}
        stored = self._from_assets(run, version, assets, (), key, name, blobs)
        if stored is None:
            raise BackendUnavailable(f"{self._where()} holds only part of checkpoint {name} of experiment {key} "
                                     "(see the COMET ERROR above); it is kept in the local spool")
        self._models[(key, name)] = assets
        return dict(stored.native)

    def _next_registry(self) -> str | None:
        """The next major version of ``register_as``; offline, Comet picks it at upload."""
        if not self.online:
            return None
        ws = self._ws_for_reads()
        with self._calling(f"reading registry model {self.register_as!r}"):
            api = self._api()
            known = self.register_as in (api.get_registry_model_names(ws) or [])
            versions = api.get_registry_model_versions(ws, self.register_as) if known else []
        return f"{max((_semver(v)[0] for v in versions), default=0) + 1}.0.0"

    def list(self, run: RunInfo) -> list[Stored]:
        if run.native.get("registry"):
            return self._registry_list(run)
        key = run.native["key"]
        state = self._state(key)
        out = []
        if not self.online:
            for d in sorted(self._mirror(key).glob("v[0-9]*")):
                if int(d.name[1:]) in state.deleted or not (d / MANIFEST).is_file():
                    continue  # deleted, or a copy that never committed
                m = read_manifest(d)
                meta = {"step": m.step, "epoch": m.epoch, "metrics": m.metrics, "size": m.size, "created": m.created,
                        "lineage": m.lineage}
                v = int(d.name[1:])
                out.append(self._stored(run, v, meta, state.aliases_of(v),
                                        {"model": model_name(v, m.step), "experiment": key, "path": str(d)}))
            return out
        blobs: dict[str, list[tuple[str, int, str]]] = {}
        with self._calling(f"listing the checkpoints of experiment {key}"):
            exp = self._api_exp(key)
            for name in exp.get_model_names() or []:
                match = _MODEL.match(name)
                if not match or int(match.group(1)) in state.deleted:
                    continue
                assets = self._models.get((key, name)) or exp.get_model_asset_list(name) or []
                v = int(match.group(1))
                if (stored := self._from_assets(run, v, assets, state.aliases_of(v), key, name, blobs)) is not None:
                    self._models[(key, name)] = assets
                    out.append(stored)
        return sorted(out, key=lambda s: s.version)

    def _from_assets(self, run: RunInfo, version: int, assets: Sequence[Mapping[str, Any]], aliases: Sequence[str],
                     key: str, name: str, blobs: dict[str, list[tuple[str, int, str]]] | None = None) -> Stored | None:
        """A Stored from a model's elements (and its experiment's blob assets, read once per
        ``blobs`` cache); None unless every file of the checkpoint is there."""
        meta = _meta(assets)
        have = {str(a["fileName"]): a for a in assets}
        if meta is None or not meta.get("files") or any(
                f not in have or int(have[f].get("fileSize") or -1) != int(size) for f, size in meta["files"].items()):
            return None  # not ours, or an upload that did not finish
        ids = {f: str(have[f]["assetId"]) for f in meta["files"]}
        shared = {str(f): int(size) for f, size in (meta.get("blobs") or {}).items()}
        if shared:
            blobs = {} if blobs is None else blobs
            if key not in blobs:
                blobs[key] = self._blob_assets(key)
            found = {(f, size): asset_id for f, size, asset_id in blobs[key]}
            if any((f, size) not in found for f, size in shared.items()):
                return None  # a blob never arrived
            ids.update({f: found[(f, size)] for f, size in shared.items()})
        native = {"model": name, "experiment": key, "assets": ids, "shared": sorted(shared)}
        return self._stored(run, version, meta, aliases, native)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        if "path" in stored.native:  # offline: already on local disk
            path = Path(stored.native["path"])
            return LocalCheckpoint(path, read_manifest(path))
        dest = Path(dest)
        try:
            return LocalCheckpoint(dest, verify(dest))  # a complete earlier download
        except (CheckpointNotFound, IntegrityError):
            pass
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            with self._calling(f"downloading {stored.ref}"):
                exp, ids, _ = self._assets_of(stored)
                for fname in ids:
                    if Path(fname).is_absolute() or ".." in Path(fname).parts:
                        raise IntegrityError(f"{stored.ref}: file name {fname!r} escapes the checkpoint")
                # the small files first; then the tensor files an earlier download of this run
                # already holds are linked, and only the others downloaded
                for fname in sorted(f for f in ids if not is_blob(f)):
                    self._download_asset(exp, ids[fname], tmp / fname)
                wanted = sorted(f for f in ids if is_blob(f))
                if wanted and (tmp / MANIFEST).is_file():
                    wanted = link_cached(tmp, read_manifest(tmp), wanted, dest)
                for fname in wanted:
                    self._download_asset(exp, ids[fname], tmp / fname)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return LocalCheckpoint(dest, read_manifest(dest))

    @staticmethod
    def _download_asset(exp: Any, asset_id: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        response = exp.get_asset(asset_id, return_type="response", stream=True)
        try:  # streamed: download_model() would hold the whole checkpoint in memory
            with open(target, "wb") as out:
                out.writelines(response.iter_content(1 << 20))
        finally:
            response.close()

    def _assets_of(self, stored: Stored) -> tuple[Any, dict[str, str], set[str]]:
        """The APIExperiment holding a version, its asset id per file name, and which files are
        shared blob assets rather than elements of the version's model."""
        key, model = stored.native["experiment"], stored.native["model"]
        exp = self._api_exp(key)
        if "assets" in stored.native and "shared" in stored.native:
            return exp, dict(stored.native["assets"]), set(stored.native["shared"])
        found = self._from_assets(stored.run, stored.version, exp.get_model_asset_list(model) or [], (), key, model)
        if found is None:  # a Stored straight from put() carries no asset ids
            raise CheckpointNotFound(f"{stored.ref}: model {model} of experiment {key} is incomplete")
        return exp, dict(found.native["assets"]), set(found.native["shared"])

    def _writable(self, stored: Stored) -> str:
        if stored.native.get("registry"):
            raise BackendError(f"{stored.ref}: registry versions are read-only here; change them in Comet's "
                               "model registry")
        return str(stored.run.native["key"])

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        key = self._writable(stored)
        with self._lock, self._run_lock(key):
            self._save_state(stored.run, self._state(key).point(aliases, stored.version))

    def delete(self, stored: Stored) -> None:
        key = self._writable(stored)
        with self._lock, self._run_lock(key):
            old = self._state(key)
            # tombstone first: a half-deleted version is never listed, and an archive uploaded
            # later (still holding the files) stays consistent
            self._save_state(stored.run, _State({a: v for a, v in old.aliases.items() if v != stored.version},
                                                max(old.last_version, stored.version),
                                                sorted({*old.deleted, stored.version})))
            if "path" in stored.native:
                path = Path(stored.native["path"])
                if path.exists():
                    trash = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
                    os.rename(path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                return
            with self._calling(f"deleting {stored.ref}"):
                exp, ids, shared = self._assets_of(stored)
                for fname, asset_id in ids.items():
                    if fname not in shared:
                        exp.delete_asset(asset_id)
                self._models.pop((key, stored.native["model"]), None)
                if shared:  # then the blobs no remaining checkpoint names (a crash between leaves extra blobs)
                    needed = {f for s in self.list(stored.run) for f in s.native.get("shared", ())}
                    for fname, _, asset_id in self._blob_assets(key):
                        if fname in shared and fname not in needed:
                            exp.delete_asset(asset_id)
                            self._held.get(key, {}).pop(fname, None)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        if not self.online:
            with self._run_lock(run.native["key"]):
                meta = self._mirror_meta(run.native["key"]) or {}
                _atomic_json(self._mirror(run.native["key"]) / "run.json",
                             {**meta, "inputs": [*meta.get("inputs", []), str(source.ref)]})
        self._save_other(run, RESUMED_FROM_KEY, str(source.ref))

    def finish_run(self, run: RunInfo) -> None:
        exp, ours = self._open.pop(str(run.native.get("key")), (None, False))
        if exp is not None:
            with self._calling(f"ending experiment {run.native['key']}"):
                if ours:
                    exp.end()  # offline: writes <key>.zip for `comet upload`
                elif self.online:
                    exp.flush()  # the user's experiment: theirs to end

    def close(self) -> None:
        """End every experiment this backend started (for tests and long-lived processes)."""
        for key in list(self._open):
            exp, ours = self._open.pop(key)
            if ours and not exp.ended:
                with self._calling(f"ending experiment {key}"):
                    exp.end()

    # -- the model registry (read-only) --------------------------------------------------------
    def _registry_run(self, workspace: str, model: str) -> RunInfo:
        if not self.online:
            raise BackendError("registry references need Comet online: set [comet] online = true")
        with self._calling(f"reading registry model {workspace}/{model}"):
            self._api().get_registry_model_details(workspace, model)
        ref = Ref(self.name, f"registry/{workspace}/{model}", params=(("url", self.url),) if self.url else ())
        return RunInfo(backend=self.name, project="registry", run_id=f"{workspace}/{model}", name=model, ref=ref,
                       resumed=True, native={"registry": True, "workspace": workspace, "model": model})

    def _registry_list(self, run: RunInfo) -> list[Stored]:
        with self._calling(f"reading registry model {run.run_id}"):
            details = self._api().get_registry_model_details(run.native["workspace"], run.native["model"])
        items = sorted(details.get("versions") or [], key=lambda v: _semver(str(v.get("version"))))
        blobs: dict[str, list[tuple[str, int, str]]] = {}
        out = []
        for i, item in enumerate(items, 1):  # :vN is the N-th version in version order
            source = item.get("experimentModel") or {}
            tags = {t for t in [item.get("version"), *(item.get("stages") or []), *(item.get("tags") or [])]
                    if isinstance(t, str) and _SEGMENT.match(t)}
            found = self._from_assets(run, i, item.get("assets") or [], sorted(tags),
                                      str(source.get("experimentKey")), str(source.get("experimentModelName")),
                                      blobs)
            if found is not None:  # only checkpoints ckpt_track logged can be restored
                out.append(replace(found, native={**found.native, "registry": True}))
        return out

    # -- references -------------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        t = text.strip()
        low = t.lower()
        if low.startswith("experiment://"):
            parts = t[len("experiment://"):].split("/")
            if len(parts) not in (2, 4) or not all(parts):
                raise InvalidRef(f"{text!r}: expected experiment://<experiment key>/<model> or "
                                 "experiment://<workspace>/<project>/<experiment name>/<model>")
            if not (match := _MODEL.match(parts[-1])):
                raise InvalidRef(f"{text!r}: model {parts[-1]!r} is not a ckpt_track checkpoint "
                                 "(those are named ckpt-v<N>-step<S>)")
            if len(parts) == 2 and not _KEY.match(parts[0]):
                raise InvalidRef(f"{text!r}: {parts[0]!r} is not an experiment key (32 to 50 letters and digits)")
            return Ref(cls.name, "/".join(parts[:-1]), version=int(match.group(1)))
        if low.startswith("registry://"):
            path, colon, version = t[len("registry://"):].partition(":")
            parts = path.split("/")
            if len(parts) != 2 or not all(parts) or (colon and not version):
                raise InvalidRef(f"{text!r}: expected registry://<workspace>/<model>[:<version or stage>]")
            return Ref(cls.name, f"registry/{parts[0]}/{parts[1]}", alias=version or None)
        if low.startswith(("http://", "https://")):
            u = urlparse(t)
            u.port  # noqa: B018 -- a port out of range raises ValueError: InvalidRef at refs.parse_ref
            parts = [p for p in u.path.split("/") if p]
            saas = (u.hostname or "") in _SAAS_HOSTS
            if len(parts) >= 3 and _KEY.match(parts[2]):  # <ws>/<project>/<key>[/...]: an experiment page
                return Ref(cls.name, "/".join(parts[:3]), params=() if saas else (("url", f"{u.scheme}://{u.netloc}"),))
            if saas:
                raise InvalidRef(f"{text!r} is not a Comet experiment page; copy an experiment's URL: "
                                 "https://www.comet.com/<workspace>/<project>/<experiment key>")
        return None

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return (
            "comet://<workspace>/<project>/<experiment key or name>[@selector | :vN]",
            "comet://<project>/<experiment key or name>   (workspace from [comet] workspace)",
            "https://www.comet.com/<workspace>/<project>/<experiment key>[/...]   (self-hosted hosts too)",
            "experiment://<experiment key>/ckpt-v<N>-step<S>",
            "experiment://<workspace>/<project>/<experiment name>/ckpt-v<N>-step<S>",
            "registry://<workspace>/<model>[:<version or stage>]   (= comet://registry/<workspace>/<model>@<version>)",
        )
