"""The ``clearml`` backend: checkpoints as ClearML models (online) or task artifacts (offline).

Online, each checkpoint is an ``OutputModel`` of the run's task: the checkpoint
directory packed as one uncompressed zip (ClearML's "package" model, so
``Model(id).get_local_copy()`` gives the directory back), aliases as model tags,
and step, epoch, metrics and lineage as model metadata; metrics also go to the
task's scalars with ``iteration=step``.  A run resumed from a checkpoint gets it
connected as an ``InputModel``.

Offline (``offline = true`` or ``CLEARML_OFFLINE_MODE=1``) ``OutputModel`` cannot
upload (clearml 2.x: ``'DummyModel' object has no attribute 'locked'``), so each
checkpoint is a task artifact (``upload_artifact`` of the directory) with the same
metadata, and the alias table lives in the task's user properties.  Those
survive ``clearml-task --import-offline-session``, so an imported run stays
restorable online; before that, ``list``/``get`` read the session folder (or its
zip) the SDK wrote.  Versions are counted per task in the user property
``ckpt_track_last_version``, so a deleted version number is never reused.

Incremental: a content-addressed tensor file (``format.is_blob``) is stored once per
task, as its own artifact ``ckpt_track-blob-t-<hex>.safetensors``; the checkpoint's
model or artifact holds the rest (manifest, state, any other file) and lists the
blobs it takes in its metadata (``blobs``), so ``get`` reassembles the directory and
``delete`` removes a blob only when no other checkpoint of the task lists it.

``ct.init`` uses the ``Task.init`` you already made, or makes one (a second run in
the same process gets ``Task.create``), stopping ClearML from reseeding the
training's random generators on the way.  See ``backends/clearml.md``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

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
from ..format import MANIFEST, LocalCheckpoint, Manifest, is_blob, link_cached, read_manifest, verify
from ..refs import Ref
from ..records import RunInfo, RunSpec, Stored

__all__ = ["ClearmlBackend"]

_HEX = r"[0-9a-f]{32}"
_UI = re.compile(rf"^https?://[^/\s?#]+(?:/[^\s?#]*?)?/(?:projects/[^/\s?#]+/)?(experiments|tasks|models)/({_HEX})"
                 r"(?:[/?#]\S*)?$")
_BARE = re.compile(rf"^(?P<id>{_HEX}|offline-{_HEX})(?P<sel>@[^?:/@\s]+|:v\d+)?$")
_FORMAT = "ckpt_track/1"  # metadata marker: an item without it is not one of our checkpoints
_P_VERSION, _P_ALIASES, _P_RESUMED = "ckpt_track_last_version", "ckpt_track_aliases", "ckpt_track_resumed_from"
_BLOB = "ckpt_track-blob-"  # + file name: the task artifact holding one content-addressed tensor file
_RUN_TAG = "ckpt_track_run_id="  # task system tag holding a user-chosen run id (ClearML picks task ids itself)
_CREDS = "set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (and CLEARML_API_HOST), or run clearml-init"


@dataclass
class _Open:
    """A task this backend writes to."""

    task: Any
    owned: bool  # created or re-opened by us, so finish_run closes it
    main: bool  # opened with Task.init (the process's main task)
    restore_offline: bool | None = None


@dataclass(frozen=True)
class _Item:
    """One checkpoint as found in the tracker."""

    version: int
    kind: str  # "model" | "artifact"
    key: str  # model id or artifact name
    record: Mapping[str, Any]
    tags: tuple[str, ...] = ()
    uri: str = ""


def _bool(value: Any, key: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"clearml backend: option {key!r} must be a boolean, got {value!r}")


def _record(m: Manifest, version: int) -> dict[str, str]:
    """Checkpoint metadata as strings (what both model metadata and artifact metadata hold)."""
    rec = {"format": _FORMAT, "version": str(version), "step": str(m.step), "created": m.created,
           "size": str(m.size), "metrics": json.dumps(dict(m.metrics), sort_keys=True),
           "lineage": json.dumps(dict(m.lineage), sort_keys=True, default=str)}
    if m.epoch is not None:
        rec["epoch"] = str(m.epoch)
    if blobs := sorted(f for f in m.files if is_blob(f)):
        rec["blobs"] = json.dumps(blobs)  # stored as task artifacts, not in the checkpoint's own package
    return rec


def _parse_record(meta: Mapping[str, str]) -> dict[str, Any] | None:
    if meta.get("format") != _FORMAT:
        return None
    try:
        return {"version": int(meta["version"]), "step": int(meta["step"]),
                "epoch": int(meta["epoch"]) if meta.get("epoch") not in (None, "", "None") else None,
                "created": meta.get("created", ""), "size": int(meta.get("size") or 0),
                "metrics": {k: float(v) for k, v in json.loads(meta.get("metrics") or "{}").items()},
                "lineage": json.loads(meta.get("lineage") or "{}"),
                "blobs": _blob_names(json.loads(meta.get("blobs") or "[]"))}
    except (KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"clearml: skipping a checkpoint with damaged metadata ({exc})", stacklevel=3)
        return None


def _blob_names(names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and is_blob(n) for n in names):
        raise ValueError(f"'blobs' is not a list of tensor file names: {str(names)[:80]}")
    return tuple(names)


def _props(task: Mapping[str, Any]) -> dict[str, str]:
    """User properties of a task document (server answer or offline task.json)."""
    return {k: str(v.get("value", "")) for k, v in ((task.get("hyperparams") or {}).get("properties") or {}).items()}


def _artifacts(task: Mapping[str, Any]) -> list[_Item]:
    items = []
    for a in ((task.get("execution") or {}).get("artifacts") or []):
        rec = _parse_record({str(k): str(v) for k, v in a.get("display_data") or []})
        if rec is not None:
            items.append(_Item(rec["version"], "artifact", a["key"], rec, uri=a.get("uri") or ""))
    return items


def _blobs(task: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The task's stored tensor files: file name -> artifact entry."""
    arts = ((task.get("execution") or {}).get("artifacts") or [])
    return {a["key"][len(_BLOB):]: a for a in arts if a["key"].startswith(_BLOB) and is_blob(a["key"][len(_BLOB):])}


def _tid(run: RunInfo) -> str:
    return str(run.native.get("task_id") or run.run_id)


def _own_files(m: Manifest) -> list[str]:
    """The files a checkpoint's own model or artifact holds: all but the content-addressed ones."""
    return [*sorted(f for f in m.files if not is_blob(f)), MANIFEST]


def _zip_files(ckpt: LocalCheckpoint, names: Sequence[str], target: Path) -> None:
    # stored, not deflated: safetensors barely compress, and extraction stays I/O-bound
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in names:
            zf.write(ckpt.path / name, arcname=name)


@contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A hidden sibling of ``dest`` to assemble a checkpoint in, renamed to ``dest`` when done."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MANIFEST).is_file():  # a concurrent fetch may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unzip(archive: Any, into: Path) -> None:
    """Unpack a checkpoint zip into the folder ``into``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith("/"):
                    continue
                if name.startswith("/") or ".." in Path(name).parts:
                    raise IntegrityError(f"checkpoint archive member {name!r} escapes its directory")
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(into / name, "wb") as out:
                    shutil.copyfileobj(src, out, 8 * 1024 * 1024)
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"downloaded checkpoint archive is not a valid zip ({exc})") from exc


def _probe(host: str) -> None:
    """Fail fast on a server that is down: the SDK would retry for minutes."""
    from ..network import current, unavailable_hint

    try:
        parts = urlsplit(host)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"the ClearML API host {host!r} is not a URL ({exc}); fix CLEARML_API_HOST "
                          "or api.api_server in clearml.conf") from exc
    try:
        socket.create_connection((parts.hostname or "", port), timeout=current().attempt_timeout).close()
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot reach the ClearML API server at {host} ({exc.strerror or exc}); "
            f"{unavailable_hint('CLEARML_API_HOST (or api.api_server in clearml.conf)')}, "
            "or set [clearml] offline = true to log without a server"
        ) from exc


def _configured_api_host() -> str | None:
    """The API server the user configured (CLEARML_API_HOST / TRAINS_API_HOST, or ``api.api_server``
    / ``api.host`` in clearml.conf), or None: then the SDK would use the public api.clear.ml."""
    from clearml.backend_api.session.defs import ENV_HOST
    from clearml.config import config_obj

    host = ENV_HOST.get() or config_obj.get("api.api_server", None) or config_obj.get("api.host", None)
    return str(host).rstrip("/") if host else None


def _session_kwargs() -> dict[str, Any]:
    """ckpt_track's bounds for the one Session it opens (``network.plan``): clearml.conf's
    defaults are 240 retries with backoff up to 120 s.  urllib3 without jitter: no global random."""
    from ..network import current

    p = current()
    n = p.retries
    return {"http_retries_config": {"total": n, "connect": n, "read": n, "redirect": n, "status": n,
                                    "backoff_factor": float(p.backoff_factor)}}


class _ApiFailure(Exception):
    def __init__(self, endpoint: str, code: int, subcode: int, msg: str) -> None:
        super().__init__(f"{endpoint}: {code}/{subcode} {msg}")
        self.code, self.subcode, self.msg = code, subcode, msg


class ClearmlBackend:
    """Checkpoints in ClearML: models of a task online, task artifacts offline."""

    name: ClassVar[str] = "clearml"
    # project: ClearML project (default: the run's); offline: write an offline session; output_uri:
    # where model packages go (default: the files server); web_host: base of UI links (default: the
    # SDK's); offline_dir: where offline sessions are looked up (default: <clearml cache>/offline)
    options: ClassVar[frozenset[str]] = frozenset({"project", "offline", "output_uri", "web_host", "offline_dir"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete", "choose_run_id", "dedup"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        unknown = set(opts) - self.options
        if unknown:
            raise ConfigError(f"clearml backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        self.project: str | None = opts.get("project") or None
        self.offline = _bool(opts.get("offline"), "offline")
        self.output_uri: str | None = opts.get("output_uri") or None
        self.web_host = str(opts.get("web_host") or "").rstrip("/") or None
        self.offline_dir = Path(opts["offline_dir"]).expanduser() if opts.get("offline_dir") else None
        self._open: dict[str, _Open] = {}
        self._session: Any = None
        self._probed = -1e9

    # -- the SDK boundary ------------------------------------------------------------------
    @staticmethod
    def _sdk() -> Any:
        try:
            import clearml
        except ImportError as exc:
            raise BackendNotInstalled("clearml", "clearml", "clearml") from exc
        return clearml

    @contextmanager
    def _boundary(self, doing: str) -> Iterator[None]:
        """Turn SDK and server errors into the ckpt_track error tree."""
        try:
            yield
        except CkptTrackError:
            raise
        except _ApiFailure as exc:
            if exc.code == 401:
                raise AuthError(f"ClearML refused the credentials while {doing}: {exc.msg}; {_CREDS}") from exc
            if exc.code == 400 and exc.subcode in (101, 201):
                raise CheckpointNotFound(f"ClearML: {exc.msg} (while {doing})") from exc
            raise BackendError(f"ClearML server error while {doing}: {exc}") from exc
        except Exception as exc:
            name, text = type(exc).__name__, str(exc)
            if name == "MissingConfigError":
                raise AuthError(f"ClearML credentials are missing ({doing}): {_CREDS}; "
                                "or set [clearml] offline = true") from exc
            if name == "LoginError" and ("401" in text or "nauthorized" in text):
                raise AuthError(f"ClearML rejected the credentials while {doing}: {text}; check "
                                "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY") from exc
            if name in ("LoginError", "ConnectionError", "MaxRetryError", "Timeout") or isinstance(exc, ConnectionError):
                self._probed = -1e9  # check the server again before the next call
                raise BackendUnavailable(f"ClearML server unreachable while {doing}: {text}") from exc
            if name == "UsageError":
                raise ConfigError(f"ClearML: {text}") from exc
            raise BackendError(f"ClearML failed while {doing}: {name}: {text}") from exc

    @staticmethod
    def _task_init(**kwargs: Any) -> Any:
        """``Task.init`` without its side effect on training: it reseeds random/numpy/torch
        (ClearML's seed 1337), so the same script would train differently on this backend."""
        from clearml import Task

        seed = getattr(Task, "_random_seed", True)  # what Task.set_random_seed last chose
        Task.set_random_seed(None)
        state = random.getstate()  # the SDK also draws from Python's global generator while starting
        try:
            task = Task.init(auto_connect_frameworks={"pytorch": False}, **kwargs)
        finally:
            random.setstate(state)
            Task.set_random_seed(seed)
        if not isinstance(task, Task):  # a StubObject: ClearML's answer in a child of a ClearML process
            raise ConfigError("ClearML's Task.init returned a stub: it takes this process for a child of the "
                              f"process in CLEARML_PROC_MASTER_ID={os.environ.get('CLEARML_PROC_MASTER_ID')!r}; "
                              "unset CLEARML_PROC_MASTER_ID and TRAINS_PROC_MASTER_ID to log from this process")
        return task

    def _connect(self) -> Any:
        """The SDK's HTTP session (online reads and small edits), after a reachability check."""
        self._sdk()
        from clearml import Task
        from clearml.backend_api import Session

        if Task.is_offline():
            raise ConfigError("this needs the ClearML server, but ClearML offline mode is on "
                              "(CLEARML_OFFLINE_MODE or [clearml] offline); turn it off to read online runs")
        if _configured_api_host() is None:  # never fall back on the vendor's public server
            raise ConfigError(
                "no ClearML server is configured: set CLEARML_API_HOST (e.g. http://127.0.0.1:8008) with "
                "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, or api.api_server in clearml.conf "
                "(clearml-init); for the hosted service set CLEARML_API_HOST=https://api.clear.ml"
            )
        if time.monotonic() - self._probed > 5.0:  # cheap, and it spares a lost server hours of SDK retries
            _probe(Session.get_api_server_host())
            self._probed = time.monotonic()
        if self._session is None:
            from ..network import current

            self._session = Session(**_session_kwargs())
            # per-session request timeouts (the SDK's are class attributes: 3/10 s first, then 10/300 s)
            t = current().attempt_timeout
            self._session._session_initial_timeout = (t, t)
            self._session._session_timeout = (t, t)
        return self._session

    def _call(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        service, _, action = endpoint.partition(".")
        res = self._connect().send_request(service, action, json=dict(body))
        try:
            payload = res.json()
        except ValueError:
            payload = {}
        meta = payload.get("meta") or {}
        if res.status_code != 200:
            raise _ApiFailure(endpoint, res.status_code, int(meta.get("result_subcode") or 0),
                              str(meta.get("result_msg") or res.reason))
        return payload.get("data") or {}

    def _web(self) -> str:
        if self.web_host is None:
            from clearml.backend_api import Session

            self.web_host = Session.get_app_server_host().rstrip("/")
        return self.web_host

    # -- runs ----------------------------------------------------------------------------------
    def _offline_mode(self) -> bool:
        if self.offline is not None:
            return self.offline
        self._sdk()
        from clearml import Task

        return bool(Task.is_offline())

    def open_run(self, spec: RunSpec) -> RunInfo:
        project = self.project or spec.project
        with self._boundary(f"opening a run in project {project!r}"):
            if self._offline_mode():
                return self._open_offline(spec, project)
            found = self._lookup(project, spec.run_id, spec.name if spec.resume != "never" else None)
            if found is not None:
                if spec.resume == "never" and spec.run_id:
                    raise ConfigError(f"run {spec.run_id!r} already exists in ClearML project {project!r} (task "
                                      f"{found['id']}) and resume='never'; pass resume='auto' or another run_id")
                return self._info(self._attach(found), resumed=True)
            if spec.resume == "must":
                if not (spec.run_id or spec.name):
                    raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
                raise CheckpointNotFound(f"no ClearML task {spec.run_id or spec.name!r} in project {project!r}")
            return self._info(self._create(spec, project), resumed=False)

    def _lookup(self, project: str, run_id: str | None, name: str | None) -> dict[str, Any] | None:
        fields = ["id", "name", "project", "system_tags", "last_update"]
        if run_id and re.fullmatch(_HEX, run_id):
            rows = self._call("tasks.get_all", {"id": [run_id], "only_fields": fields})["tasks"]
        elif run_id or name:
            projects = self._call("projects.get_all", {"name": f"^{re.escape(project)}$", "only_fields": ["id"]})
            if not projects["projects"]:
                return None
            query: dict[str, Any] = {"project": [p["id"] for p in projects["projects"]], "only_fields": fields,
                                     "order_by": ["-last_update"]}
            query.update({"system_tags": [_RUN_TAG + run_id]} if run_id else {"name": f"^{re.escape(str(name))}$"})
            rows = self._call("tasks.get_all", query)["tasks"]
        else:
            return None
        rows = [r for r in rows if "archived" not in (r.get("system_tags") or [])]
        return rows[0] if rows else None

    def _attach(self, row: Mapping[str, Any]) -> _Open:
        from clearml import Task

        tid, current = row["id"], Task.current_task()
        if tid in self._open:
            return self._open[tid]
        if current is not None and current.id == tid:
            op = _Open(current, owned=False, main=True)
        elif current is None:
            task = self._task_init(task_name=row.get("name"), continue_last_task=tid, output_uri=self.output_uri or True)
            task.set_initial_iteration(0)  # scalars are reported at the real step, not offset by ClearML
            op = _Open(task, owned=True, main=True)
        else:
            task = Task.get_task(task_id=tid)
            task.mark_started(force=True)
            op = _Open(task, owned=True, main=False)
        self._open[tid] = op
        return op

    def _create(self, spec: RunSpec, project: str) -> _Open:
        from clearml import Task

        current = Task.current_task()
        if current is not None and spec.run_id is None and spec.name is None:
            op = _Open(current, owned=False, main=True)  # the user's own Task.init: log into it
        elif current is None:
            task = self._task_init(project_name=project, task_name=spec.name or spec.run_id, reuse_last_task_id=False,
                                   output_uri=self.output_uri or True)
            op = _Open(task, owned=True, main=True)
        else:  # a second run in this process: ClearML allows one Task.init per process
            task = Task.create(project_name=project, task_name=spec.name or spec.run_id or "ckpt_track run",
                               add_task_init_call=False, detect_repository=False)
            task.output_uri = self.output_uri or True
            task.mark_started(force=True)
            op = _Open(task, owned=True, main=False)
        return self._adopt(op, spec)

    def _adopt(self, op: _Open, spec: RunSpec) -> _Open:
        """Mark a new task as ours (and with the user's run id), record the config, hold it."""
        if op.owned:
            tags = ["ckpt_track", *([_RUN_TAG + spec.run_id] if spec.run_id else [])]
            op.task.set_system_tags(sorted(set(op.task.get_system_tags() or []) | set(tags)))
        if spec.config:
            op.task.connect(dict(spec.config), name="config")
        self._open[op.task.id] = op
        return op

    def _open_offline(self, spec: RunSpec, project: str) -> RunInfo:
        from clearml import Task

        if spec.run_id and self._sessions(run_id=spec.run_id):
            raise ConfigError(
                f"run {spec.run_id!r} is an offline ClearML session, which cannot be continued; import it "
                "(clearml-task --import-offline-session <zip>) and resume online, or start a new run and call "
                "run.resume(ref='clearml://offline-...') to continue from its checkpoint")
        if spec.resume == "must":
            raise CheckpointNotFound(f"no offline ClearML session for run {spec.run_id or spec.name!r}")
        current = Task.current_task()
        if current is not None:
            if str(current.id).startswith("offline-") and spec.run_id is None and spec.name is None:
                op = _Open(current, owned=False, main=True)
            else:
                raise ConfigError("ClearML offline mode allows one task per process and one is open; "
                                  "finish the other run first")
        else:
            was = bool(Task.is_offline())
            Task.set_offline(True)
            task = self._task_init(project_name=project, task_name=spec.name or spec.run_id, reuse_last_task_id=False)
            op = _Open(task, owned=True, main=True, restore_offline=was)
        return self._info(self._adopt(op, spec), resumed=False)

    def _info(self, op: _Open, resumed: bool) -> RunInfo:
        t = op.task
        return self._run_info({"id": t.id, "name": t.name, "system_tags": t.get_system_tags() or [],
                               "project_name": t.get_project_name(), "project": t.project}, resumed)

    def _run_info(self, doc: Mapping[str, Any], resumed: bool, params: tuple[tuple[str, str], ...] = ()) -> RunInfo:
        tid = str(doc["id"])
        run_id = next((t[len(_RUN_TAG):] for t in doc.get("system_tags") or [] if t.startswith(_RUN_TAG)), tid)
        offline = tid.startswith("offline-")
        native = {"task_id": tid, "offline": offline}
        if not offline and doc.get("project"):
            native["url"] = f"{self._web()}/projects/{doc['project']}/tasks/{tid}/output/log"
        return RunInfo(backend=self.name, project=str(doc.get("project_name") or ""), run_id=run_id,
                       name=str(doc.get("name") or tid), ref=Ref(self.name, tid, params=params),
                       resumed=resumed, native=native)

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        with self._boundary(f"looking up {ref}"):
            if len(segs) == 2 and segs[0] == "models":
                return self.find_run(self.resolve_ref(ref))
            if len(segs) == 1 and re.fullmatch(rf"offline-{_HEX}", segs[0]):
                return self._run_info(self._session_doc(segs[0])[0], True, ref.params)
            if len(segs) == 1 and re.fullmatch(_HEX, segs[0]):
                rows = self._call("tasks.get_all", {"id": [segs[0]]})["tasks"]
                if not rows:
                    raise CheckpointNotFound(f"{ref}: no ClearML task {segs[0]} on {self._connect().host}")
                return self._run_info(self._with_project_name(rows[0]), True, ref.params)
            if len(segs) >= 2:
                project, wanted = "/".join(segs[:-1]), segs[-1]
                if self._offline_mode():
                    docs = self._sessions(run_id=wanted, project=project) or self._sessions(name=wanted, project=project)
                    if docs:
                        return self._run_info(docs[-1], True, ref.params)
                else:
                    row = self._lookup(project, wanted, None) or self._lookup(project, None, wanted)
                    if row is not None:
                        return self.find_run(Ref(self.name, row["id"], params=ref.params))
                raise CheckpointNotFound(f"{ref}: no ClearML run named {wanted!r} in project {project!r}")
        raise InvalidRef(f"{ref}: not a ClearML run; accepted forms:\n  " + "\n  ".join(self.ref_forms()))

    def _with_project_name(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("project"):
            projects = self._call("projects.get_all", {"id": [row["project"]], "only_fields": ["id", "name"]})
            row["project_name"] = next((p["name"] for p in projects["projects"]), "")
        return row

    def resolve_ref(self, ref: Ref) -> Ref:
        """``clearml://models/<model_id>`` -> ``clearml://<task_id>:vN`` (the run that logged it)."""
        segs = ref.segments
        if len(segs) != 2 or segs[0] != "models":
            return ref
        if not re.fullmatch(_HEX, segs[1]):
            raise InvalidRef(f"{ref}: a ClearML model id is 32 hex digits")
        with self._boundary(f"looking up model {segs[1]}"):
            rows = self._call("models.get_all", {"id": [segs[1]], "only_fields": ["id", "task", "metadata"]})["models"]
        item = self._model_item(rows[0]) if rows else None
        if item is None or not rows[0].get("task"):
            why = "no such model" if not rows else "the model is not a ckpt_track checkpoint"
            raise CheckpointNotFound(f"{ref}: {why} on the ClearML server")
        return Ref(self.name, rows[0]["task"], version=item.version, params=ref.params)

    # -- reading a run's checkpoints ------------------------------------------------------------
    def _state(self, run: RunInfo) -> tuple[list[_Item], dict[str, str], dict[str, Any], dict[str, Mapping[str, Any]]]:
        """(checkpoints, user properties, where they live, stored tensor files) of a run."""
        tid = _tid(run)
        if tid.startswith("offline-"):
            doc, where = self._session_doc(tid)
            return _artifacts(doc), _props(doc), where, _blobs(doc)
        rows = self._call("tasks.get_all", {"id": [tid], "only_fields": ["id", "hyperparams", "execution.artifacts"]})
        if not rows["tasks"]:
            raise CheckpointNotFound(f"{run.ref}: the ClearML task {tid} no longer exists")
        items, page = _artifacts(rows["tasks"][0]), 0
        while True:  # paged, like the SDK's own queries
            batch = self._call("models.get_all", {"task": [tid], "page": page, "page_size": 500,
                                                  "only_fields": ["id", "tags", "metadata", "uri", "task"]})["models"]
            items.extend(i for r in batch if (i := self._model_item(r)))
            if len(batch) < 500:
                break
            page += 1
        return items, _props(rows["tasks"][0]), {"task_id": tid}, _blobs(rows["tasks"][0])

    @staticmethod
    def _model_item(row: Mapping[str, Any]) -> _Item | None:
        meta = {str(k): str((v or {}).get("value", "")) for k, v in (row.get("metadata") or {}).items()}
        rec = _parse_record(meta)
        if rec is None:
            return None
        return _Item(rec["version"], "model", row["id"], rec, tuple(row.get("tags") or ()), row.get("uri") or "")

    def list(self, run: RunInfo) -> list[Stored]:
        with self._boundary(f"listing the checkpoints of {run.ref}"):
            items, props, where, _ = self._state(run)
        table = self._table(props)
        out: dict[int, Stored] = {}
        for item in sorted(items, key=lambda i: i.version):
            out.setdefault(item.version, self._stored(run, item, table, where))
        return list(out.values())

    def _stored(self, run: RunInfo, item: _Item, table: Mapping[str, int], where: Mapping[str, Any]) -> Stored:
        aliases = set(item.tags) | {a for a, v in table.items() if v == item.version}
        native = {"kind": item.kind, "key": item.key, "uri": item.uri, "blobs": item.record["blobs"], **where}
        if item.kind == "model":
            native["url"] = f"{self._web()}/projects/*/models/{item.key}/general"
        rec = item.record
        return Stored(ref=run.ref.select(version=item.version), run=run, version=item.version, step=rec["step"],
                      epoch=rec["epoch"], aliases=tuple(sorted(aliases)), metrics=rec["metrics"], size=rec["size"],
                      created=rec["created"], lineage=rec["lineage"], native=native)

    @staticmethod
    def _table(props: Mapping[str, str]) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(props.get(_P_ALIASES) or "{}").items()}
        except (TypeError, ValueError, AttributeError):
            warnings.warn(f"clearml: ignoring a damaged {_P_ALIASES} user property", stacklevel=3)
            return {}

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        dest = Path(dest)
        if (dest / MANIFEST).is_file():
            try:
                return LocalCheckpoint(dest, verify(dest))
            except (IntegrityError, CheckpointNotFound):
                pass
        if dest.exists():  # the core's cache entry for this version, damaged or half-written: fetch again
            shutil.rmtree(dest)
        native = stored.native
        with self._boundary(f"downloading {stored.ref}"), _staged(dest) as tmp:
            self._fetch_own(native, tmp)
            # the tensor files stored once per task (absent from checkpoints of earlier versions)
            manifest = read_manifest(tmp)
            wanted = [f for f in manifest.files if is_blob(f) and not (tmp / f).exists()]
            # files an earlier download of this run already holds are linked, not fetched again
            wanted = link_cached(tmp, manifest, wanted, dest)
            if wanted:
                self._fetch_blobs(stored, wanted, tmp)
        return LocalCheckpoint(dest, read_manifest(dest))

    def _fetch_own(self, native: Mapping[str, Any], into: Path) -> None:
        """Unpack a checkpoint's own model package or artifact zip into ``into``."""
        if native.get("session"):
            self._session_file(native, native["uri"], into / ".package.zip")
            _unzip(into / ".package.zip", into)
            (into / ".package.zip").unlink()
        elif native["kind"] == "model":
            from clearml import Model

            self._connect()
            _unzip(Model(model_id=native["key"]).get_weights(raise_on_error=True, extract_archive=False), into)
        else:
            from clearml import Task

            self._connect()
            artifact = Task.get_task(task_id=native["task_id"]).artifacts[native["key"]]
            _unzip(artifact.get_local_copy(extract_archive=False, raise_on_error=True), into)

    def _fetch_blobs(self, stored: Stored, names: Sequence[str], into: Path) -> None:
        tid = stored.native["task_id"]
        if stored.native.get("session"):
            held = _blobs(self._session_doc(tid)[0])
        else:
            from clearml import Task

            self._connect()
            artifacts = Task.get_task(task_id=tid).artifacts
            held = {f: artifacts[_BLOB + f] for f in names if _BLOB + f in artifacts}
        for fname in names:
            if fname not in held:
                raise IntegrityError(f"{stored.ref} needs {fname}, but task {tid} has no artifact {_BLOB}{fname} "
                                     "(deleted outside ckpt_track?); this checkpoint cannot be restored")
            if stored.native.get("session"):
                self._session_file(stored.native, held[fname]["uri"], into / fname)
            else:  # copied out of the SDK's download cache, which evicts files as it pleases
                shutil.copyfile(held[fname].get_local_copy(extract_archive=False, raise_on_error=True), into / fname)

    # -- offline sessions --------------------------------------------------------------------------
    def _session_dirs(self) -> list[Path]:
        from clearml.config import get_offline_dir

        return [*([self.offline_dir] if self.offline_dir else []), Path(get_offline_dir())]

    def _session_doc(self, task_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """task.json of an offline session, from its folder or else its zip."""
        for base in self._session_dirs():
            folder, archive = base / task_id, base / f"{task_id}.zip"
            for attempt in range(3):  # the SDK rewrites task.json in place while the run is open
                try:
                    if (folder / "task.json").is_file():
                        return json.loads((folder / "task.json").read_text()), {"session": str(folder), "task_id": task_id}
                    if archive.is_file():
                        with zipfile.ZipFile(archive) as zf:
                            doc = json.loads(zf.read("task.json"))
                        return doc, {"session": str(archive), "task_id": task_id}
                    break
                except ValueError:
                    if attempt == 2:
                        raise IntegrityError(f"offline session {task_id} has an unreadable task.json") from None
        where = ", ".join(map(str, self._session_dirs())) or "(no offline folder configured)"
        raise CheckpointNotFound(f"no offline ClearML session {task_id} in {where}; pass ?offline_dir=<folder> "
                                 "or set [clearml] offline_dir to where the session folder or zip is")

    def _sessions(self, *, run_id: str | None = None, name: str | None = None,
                  project: str | None = None) -> list[dict[str, Any]]:
        ids = sorted({p.name.removesuffix(".zip") for d in self._session_dirs() if d.is_dir()
                      for p in d.glob("offline-*") if re.fullmatch(rf"offline-{_HEX}(\.zip)?", p.name)})
        found = []
        for tid in ids:
            doc = self._session_doc(tid)[0]
            if project is not None and doc.get("project_name") != project:
                continue
            if run_id is not None and _RUN_TAG + run_id not in (doc.get("system_tags") or []):
                continue
            if name is not None and doc.get("name") != name:
                continue
            found.append(doc)
        return found

    def _session_file(self, native: Mapping[str, Any], uri: str, target: Path) -> None:
        """Copy one stored file (artifact ``uri``) out of an offline session's folder or zip."""
        session = Path(native["session"])
        doc = self._session_doc(native["task_id"])[0]
        rel = os.path.relpath(uri, doc.get("offline_folder") or session)
        if session.is_dir():
            shutil.copyfile(session / rel, target)
            return
        with zipfile.ZipFile(session) as zf, zf.open(Path(rel).as_posix()) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 8 * 1024 * 1024)

    # -- writing -----------------------------------------------------------------------------------
    def _writable(self, run: RunInfo) -> _Open:
        tid = _tid(run)
        op = self._held(tid)
        if op is None:
            if tid.startswith("offline-"):
                raise BackendError(f"{run.ref} cannot be changed: a closed offline session is read-only; "
                                   "import it with clearml-task --import-offline-session <zip> first")
            from clearml import Task

            self._connect()
            op = _Open(Task.get_task(task_id=tid), owned=False, main=False)
        self._open[tid] = op
        return op

    def _held(self, tid: str) -> _Open | None:
        if tid in self._open:
            return self._open[tid]
        from clearml import Task

        current = Task.current_task()
        return _Open(current, owned=False, main=True) if current is not None and current.id == tid else None

    def _set_props(self, run: RunInfo, **props: str) -> None:
        tid = _tid(run)
        op = self._held(tid)
        if op is not None:  # through the SDK, so its cached copy of the task stays current
            op.task.set_user_properties(**props)
        elif tid.startswith("offline-"):
            self._writable(run)  # raises: a closed session is read-only
        else:  # a finished run (e.g. ckpt-track gc): force, as the UI may edit properties of any task
            self._call("tasks.edit_hyper_params", {"task": tid, "force": True, "hyperparams": [
                {"section": "properties", "name": k, "value": v, "type": "str"} for k, v in props.items()]})

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        aliases = sorted(set(aliases))
        with self._boundary(f"storing step {ckpt.step} in {run.ref}"):
            if not run.native.get("offline"):
                self._connect()
            op = self._writable(run)
            items, props, _, held = self._state(run)
            last = max([int(props.get(_P_VERSION) or 0), *(i.version for i in items)])
            version, record = last + 1, _record(ckpt.manifest, last + 1)
            table = {a: v for a, v in self._table(props).items() if a not in aliases}
            name, tid = f"ckpt-v{version:06d}", _tid(run)
            files = ckpt.manifest.files
            # blobs first, the checkpoint last: a checkpoint never lists a file the task lacks, and a
            # put that fails half-way leaves blobs its retry finds already stored
            sent = [f for f in sorted(files) if is_blob(f) and held.get(f, {}).get("content_size") != files[f].size]
            for fname in sent:
                if not op.task.upload_artifact(_BLOB + fname, artifact_object=str(ckpt.path / fname),
                                               wait_on_upload=True):
                    raise BackendError(f"ClearML did not store {fname} of step {ckpt.step} in {run.ref}")
            own = _own_files(ckpt.manifest)
            uploaded = sum(files[f].size for f in sent) + sum((ckpt.path / f).stat().st_size for f in own)
            if run.native.get("offline"):
                if not op.task.upload_artifact(name, artifact_object=[ckpt.path / f for f in own], metadata=record,
                                               wait_on_upload=True):
                    raise BackendError(f"ClearML did not store the artifact for step {ckpt.step} in {run.ref}")
                table.update({a: version for a in aliases})
                uri = str(op.task.artifacts[name].url)
                item, where = _Item(version, "artifact", name, _parse_record(record) or {}, uri=uri), {
                    "session": str(op.task.get_offline_mode_folder()), "task_id": tid}
            else:
                model_id, uri = self._upload_model(op, ckpt, version, aliases, record)
                self._untag([i for i in items if i.kind == "model"], set(aliases), keep=model_id)
                item = _Item(version, "model", model_id, _parse_record(record) or {}, tuple(aliases), uri)
                where = {"task_id": tid}
            self._set_props(run, **{_P_VERSION: str(version), _P_ALIASES: json.dumps(table, sort_keys=True)})
            logger = op.task.get_logger()
            for metric, value in sorted(ckpt.manifest.metrics.items()):
                if math.isfinite(value):  # the server rejects NaN/inf scalars
                    title, _, series = metric.rpartition("/")
                    logger.report_scalar(title or series, series, value, iteration=ckpt.step)
            return replace(self._stored(run, item, table, where), uploaded=uploaded)

    def _upload_model(self, op: _Open, ckpt: LocalCheckpoint, version: int, aliases: list[str],
                      record: Mapping[str, str]) -> tuple[str, str]:
        from clearml import OutputModel

        model = OutputModel(task=op.task, name=f"{op.task.name} v{version} step {ckpt.step}", tags=aliases,
                            framework="PyTorch", comment=f"ckpt_track checkpoint v{version} at step {ckpt.step}")
        try:  # next to the checkpoint (same disk); the temp dir when that is read-only
            tmp = Path(tempfile.mkdtemp(prefix=".ckpt_track-", dir=ckpt.path.parent))
        except OSError:
            tmp = Path(tempfile.mkdtemp(prefix="ckpt_track-"))
        try:
            archive = tmp / f"ckpt-v{version:06d}.zip"
            _zip_files(ckpt, _own_files(ckpt.manifest), archive)
            # our own package zip + is_package: the SDK's update_weights_package leaves its temp zip
            # behind when uploading synchronously, and we are already off the training thread
            model.update_weights(weights_filename=str(archive), target_filename=archive.name, iteration=ckpt.step,
                                 is_package=True, auto_delete_file=False, async_enable=False, update_comment=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # metadata last: it is what marks the model as a committed checkpoint
        model.set_all_metadata({k: {"value": v, "type": "str"} for k, v in record.items()}, replace=True)
        return str(model.id), str(model.url)

    def _untag(self, models: Sequence[_Item], aliases: set[str], keep: str | None = None) -> None:
        for item in models:
            if item.key != keep and aliases & set(item.tags):
                self._call("models.edit", {"model": item.key, "tags": [t for t in item.tags if t not in aliases]})

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        wanted = set(aliases)
        with self._boundary(f"moving aliases {sorted(wanted)} to {stored.ref}"):
            items, props, _, _ = self._state(stored.run)
            models = [i for i in items if i.kind == "model"]
            if models:
                self._untag(models, wanted, keep=stored.native["key"])
            if stored.native["kind"] == "model":
                mine = next(i for i in models if i.key == stored.native["key"])
                self._call("models.edit", {"model": mine.key, "tags": sorted(set(mine.tags) | wanted)})
            table = self._table(props)
            new = {a: v for a, v in table.items() if a not in wanted}
            if stored.native["kind"] == "artifact":
                new.update({a: stored.version for a in wanted})
            if new != table:
                self._set_props(stored.run, **{_P_ALIASES: json.dumps(new, sort_keys=True)})

    def delete(self, stored: Stored) -> None:
        native = stored.native
        with self._boundary(f"deleting {stored.ref}"):
            if native["kind"] == "model":
                from clearml import Model

                self._connect()
                try:
                    Model.remove(native["key"], delete_weights_file=True, force=True, raise_on_errors=True)
                except ValueError:
                    if self._call("models.get_all", {"id": [native["key"]], "only_fields": ["id"]})["models"]:
                        raise
                    warnings.warn(f"clearml: {stored.ref} was deleted but its file {native['uri']} could not be "
                                  "removed from storage", stacklevel=2)
            else:
                self._delete_artifacts(stored, {native["key"]: native["uri"]})
            items, props, _, held = self._state(stored.run)
            # its tensor files that no other checkpoint lists; not every unlisted blob: a put running
            # elsewhere may have stored new ones it has not listed yet
            needed = {f for i in items for f in i.record["blobs"]}
            if unused := {_BLOB + f: str(held[f].get("uri") or "") for f in native.get("blobs", ())
                          if f in held and f not in needed}:
                self._delete_artifacts(stored, unused)
            table = self._table(props)
            if any(v == stored.version for v in table.values()):
                self._set_props(stored.run, **{_P_ALIASES: json.dumps(
                    {a: v for a, v in table.items() if v != stored.version}, sort_keys=True)})

    def _delete_artifacts(self, stored: Stored, uris: Mapping[str, str]) -> None:
        op = self._writable(stored.run)
        op.task.delete_artifacts(sorted(uris), raise_on_errors=True, delete_from_storage=True)
        # the SDK re-sends every artifact uploaded by this process with the next upload, which
        # would bring these back (clearml 2.1); tests check this attribute still exists
        uploaded = getattr(getattr(op.task, "_artifacts_manager", None), "_task_artifact_list", [])
        uploaded[:] = [a for a in uploaded if getattr(a, "key", None) not in uris]
        if stored.native.get("session"):  # offline, the SDK leaves the files in the session folder
            for uri in uris.values():
                if uri and Path(uri).exists():
                    shutil.rmtree(Path(uri).parent, ignore_errors=True)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        with self._boundary(f"recording that {run.ref} resumes from {source.ref}"):
            op = self._writable(run)
            self._set_props(run, **{_P_RESUMED: str(source.ref)})
            if source.native.get("kind") == "model" and not run.native.get("offline"):
                from clearml import InputModel

                InputModel(model_id=source.native["key"]).connect(op.task, name=f"resumed_from_v{source.version}")

    def finish_run(self, run: RunInfo) -> None:
        op = self._open.pop(_tid(run), None)
        if op is None:
            return
        with self._boundary(f"closing {run.ref}"):
            if op.owned and op.main:
                op.task.close()  # flushes reports and marks the task completed
            elif op.owned:
                op.task.flush(wait_for_uploads=True)
                op.task.mark_completed()
                op.task.close()
            else:
                op.task.flush(wait_for_uploads=True)  # the user's own task: they close it
            if op.restore_offline is not None:
                from clearml import Task

                Task.set_offline(op.restore_offline)

    # -- references --------------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        text = text.strip()
        if m := _UI.match(text):
            kind, ident = m.groups()
            return Ref(cls.name, f"models/{ident}" if kind == "models" else ident)
        if m := _BARE.match(text):
            return Ref.parse(f"{cls.name}://{m.group('id')}{m.group('sel') or ''}")
        return None

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return (
            "clearml://<task_id>[@selector]   clearml://offline-<hex>[@selector]   <task_id>   offline-<hex>",
            "clearml://models/<model_id>   clearml://<project>/<task name or run id>[@selector]",
            ("ClearML UI URLs: https://app.clear.ml/projects/<id|*>/experiments/<task_id>/..., "
             ".../projects/<id>/tasks/<task_id>/..., .../projects/<id>/models/<model_id>/... (any web host)"),
        )
