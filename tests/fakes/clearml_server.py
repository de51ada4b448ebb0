"""A loopback fake of the ClearML server's HTTP API and file server, for tests.

The real ``clearml`` SDK talks to it unchanged: ``POST /auth.login`` with basic
auth returns a JWT (the SDK reads the API version from it without checking the
signature), then JSON-RPC-style calls ``POST /<service>.<action>`` with a bearer
token, answered in the server's envelope ``{"meta": {...}, "data": {...}}``.
Files live under ``/files/`` (the file server protocol: multipart ``POST`` to
upload, ``GET`` to download, ``DELETE``).

Only the endpoints the SDK calls for tasks, models, artifacts, hyper-parameters
and scalars are implemented, with the server's semantics for what ckpt_track and
the SDK rely on (filters, tag expressions, ordering, task <-> model links).  An
endpoint that is not implemented answers HTTP 400 and is recorded in
``unknown``, so a test can assert the SDK never reached outside the fake.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["ApiError", "FakeClearmlServer"]

API_VERSION = "2.31"  # what a 2025 server reports; the SDK picks its newest schema <= this
SERVER_VERSION = "2.0.0"


class ApiError(Exception):
    """An error answer in the server's envelope."""

    def __init__(self, code: int, subcode: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.subcode, self.msg = code, subcode, msg


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any], key: bytes) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tags_match(have: list[str], expr: list[str] | None) -> bool:
    """The server's tag filter: OR by default, ``-tag`` excludes, ``__$all``/``__$and`` switch to AND,
    ``__$or`` back to OR, ``__$not`` negates the next tag."""
    if not expr:
        return True
    mode, negate_next = "or", False
    groups: list[tuple[str, list[bool]]] = [("or", [])]
    for item in expr:
        if item in ("__$all", "__$and"):
            mode = "and"
            groups.append((mode, []))
            continue
        if item in ("__$or", "__$any"):
            mode = "or"
            groups.append((mode, []))
            continue
        if item == "__$not":
            negate_next = True
            continue
        neg = negate_next or item.startswith("-")
        tag = item.removeprefix("-")
        negate_next = False
        groups[-1][1].append((tag in have) != neg)
    results = [all(v) if m == "and" else any(v) for m, v in groups if v]
    return all(results)


def _project(doc: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    if not fields:
        return copy.deepcopy(doc)
    out: dict[str, Any] = {}
    for f in fields:
        top = f.split(".")[0]
        if top in doc:
            out[top] = copy.deepcopy(doc[top])
    out["id"] = doc["id"]
    return out


class FakeClearmlServer:
    """Start with :meth:`start`, point ``CLEARML_API_HOST``/``CLEARML_FILES_HOST`` at
    :attr:`api_host`/:attr:`files_host`, and use :attr:`access_key`/:attr:`secret_key`."""

    def __init__(self, access_key: str = "CKPTTRACKTESTKEY0000", secret_key: str = "ckpt-track-test-secret") -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self._key = uuid.uuid4().bytes
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.reset()

    # -- life cycle -------------------------------------------------------------------
    def start(self, port: int = 0) -> FakeClearmlServer:
        """Serve on ``port`` (0: a free one); a stopped server restarts with its state."""
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-clearml", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, as a dead server would."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return int(self._httpd.server_address[1])

    @property
    def api_host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def files_host(self) -> str:
        return f"http://127.0.0.1:{self.port}/files"

    def reset(self) -> None:
        """Forget every project, task, model, event and file (between tests)."""
        with self._lock:
            self.projects: dict[str, dict[str, Any]] = {}
            self.tasks: dict[str, dict[str, Any]] = {}
            self.models: dict[str, dict[str, Any]] = {}
            self.events: list[dict[str, Any]] = []
            self.files: dict[str, bytes] = {}
            self.uploads: list[tuple[str, int]] = []  # (file key, bytes) of every upload, in order
            self.calls: list[str] = []
            self.unknown: list[str] = []

    # -- helpers for tests ----------------------------------------------------------------
    def scalars(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("task") == task_id and e.get("type") == "training_stats_scalar"]

    def project_id(self, name: str) -> str | None:
        return next((p["id"] for p in self.projects.values() if p["name"] == name), None)

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, endpoint: str, body: Any) -> dict[str, Any]:
        fn: Callable[[Any], dict[str, Any]] | None = getattr(self, "_" + endpoint.replace(".", "__"), None)
        with self._lock:
            self.calls.append(endpoint)
            if fn is None:
                self.unknown.append(endpoint)
                raise ApiError(400, 0, f"fake ClearML server: endpoint {endpoint} is not implemented")
            return fn(body if body is not None else {})

    def _get(self, table: dict[str, dict[str, Any]], kind: str, ident: str) -> dict[str, Any]:
        try:
            return table[ident]
        except KeyError:
            raise ApiError(400, 101 if kind == "task" else 201, f"Invalid {kind} id: id={ident}") from None

    @staticmethod
    def _query(docs: list[dict[str, Any]], body: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for d in docs:
            if body.get("id") and d["id"] not in _as_list(body["id"]):
                continue
            if body.get("name") and not re.search(body["name"], d.get("name") or ""):
                continue
            if body.get("project") and d.get("project") not in _as_list(body["project"]):
                continue
            if body.get("task") and d.get("task") not in _as_list(body["task"]):
                continue
            if body.get("status") and d.get("status") not in _as_list(body["status"]):
                continue
            if body.get("type") and d.get("type") not in _as_list(body["type"]):
                continue
            if not _tags_match(d.get("tags") or [], body.get("tags")):
                continue
            if not _tags_match(d.get("system_tags") or [], body.get("system_tags")):
                continue
            if body.get("ready") is not None and bool(d.get("ready")) != bool(body["ready"]):
                continue
            meta_ok = True
            for key, want in body.items():
                m = re.fullmatch(r"metadata\.(.+)\.value", key)
                if m:
                    item = (d.get("metadata") or {}).get(m.group(1))
                    if item is None or item.get("value") not in _as_list(want):
                        meta_ok = False
            if not meta_ok:
                continue
            out.append(d)
        for key in reversed(body.get("order_by") or []):
            desc = key.startswith("-")
            field = key.lstrip("-+")
            out.sort(key=lambda d: str(d.get(field) or ""), reverse=desc)
        page, size = body.get("page"), body.get("page_size")
        if page is not None and size:
            out = out[page * size:(page + 1) * size]
        return [_project(d, body.get("only_fields")) for d in out]

    # -- auth -------------------------------------------------------------------------------
    def _auth__login(self, body: Any) -> dict[str, Any]:
        claims = {"identity": {"user": "ckpt-track-test", "company": "fake"}, "api_version": API_VERSION,
                  "server_version": SERVER_VERSION, "env": "test", "iat": int(time.time()),
                  "exp": int(time.time()) + 24 * 3600}
        return {"token": _jwt(claims, self._key)}

    def token_ok(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        token = header[7:]
        try:
            head, body, sig = token.split(".")
        except ValueError:
            return False
        good = _b64(hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest())
        return hmac.compare_digest(sig, good)

    # -- projects -----------------------------------------------------------------------------
    def _projects__get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"projects": self._query(list(self.projects.values()), body)}

    def _projects__get_by_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"project": copy.deepcopy(self._get(self.projects, "project", body["project"]))}

    def _projects__create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["name"]
        if any(p["name"] == name for p in self.projects.values()):
            raise ApiError(409, 0, f"Project with the same name already exists: name={name}")
        pid = uuid.uuid4().hex
        self.projects[pid] = {"id": pid, "name": name, "basename": name.rsplit("/", 1)[-1],
                              "description": body.get("description", ""), "created": _now(),
                              "last_update": _now(), "tags": body.get("tags") or [],
                              "system_tags": body.get("system_tags") or [],
                              "default_output_destination": body.get("default_output_destination")}
        return {"id": pid}

    # -- tasks ----------------------------------------------------------------------------------
    def _tasks__create(self, body: dict[str, Any]) -> dict[str, Any]:
        tid = uuid.uuid4().hex
        doc = {k: copy.deepcopy(v) for k, v in body.items() if v is not None}
        doc.update({"id": tid, "status": "created", "created": _now(), "last_update": _now(),
                    "last_change": _now(), "user": "ckpt-track-test", "company": "fake"})
        doc.setdefault("tags", [])
        doc.setdefault("system_tags", [])
        doc.setdefault("models", {"input": [], "output": []})
        doc.setdefault("execution", {})
        doc.setdefault("hyperparams", {})
        doc.setdefault("configuration", {})
        doc["output"] = {"destination": body.get("output_dest")} if body.get("output_dest") else {}
        self.tasks[tid] = doc
        return {"id": tid}

    def _tasks__get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        docs = [t for t in self.tasks.values() if body.get("search_hidden") or "hidden" not in t.get("system_tags", [])]
        return {"tasks": self._query(docs, body)}

    def _tasks__get_by_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"task": copy.deepcopy(self._get(self.tasks, "task", body["task"]))}

    def _touch(self, doc: dict[str, Any]) -> None:
        doc["last_update"] = doc["last_change"] = _now()

    def _task_editable(self, doc: dict[str, Any], body: dict[str, Any]) -> None:
        if doc["status"] not in ("created", "in_progress") and not body.get("force"):
            raise ApiError(400, 110, f"Invalid task status (Invalid status change): status={doc['status']}")

    def _tasks__edit(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        self._task_editable(doc, body)
        fields = {k: v for k, v in body.items() if k not in ("task", "force") and v is not None}
        if "output_dest" in fields:
            doc.setdefault("output", {})["destination"] = fields.pop("output_dest")
        doc.update(copy.deepcopy(fields))
        self._touch(doc)
        return {"updated": 1, "fields": {}}

    def _tasks__update(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        doc.update({k: copy.deepcopy(v) for k, v in body.items() if k != "task" and v is not None})
        self._touch(doc)
        return {"updated": 1, "fields": {}}

    def _status(self, body: dict[str, Any], new: str) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        doc["status"] = new
        doc["status_changed"] = _now()
        doc["status_message"] = body.get("status_message") or ""
        doc["status_reason"] = body.get("status_reason") or ""
        if new == "in_progress":
            doc.setdefault("started", _now())
        if new in ("completed", "stopped", "closed"):
            doc["completed"] = _now()
        self._touch(doc)
        return {"updated": 1, "fields": {"status": new}}

    def _tasks__started(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**self._status(body, "in_progress"), "started": 1}

    def _tasks__completed(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._status(body, "completed")

    def _tasks__stopped(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._status(body, "stopped")

    def _tasks__close(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._status(body, "closed")

    def _tasks__failed(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._status(body, "failed")

    def _tasks__ping(self, body: dict[str, Any]) -> dict[str, Any]:
        self._get(self.tasks, "task", body["task"])
        return {}

    def _tasks__set_requirements(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        doc.setdefault("script", {})["requirements"] = body.get("requirements")
        return {"updated": 1, "fields": {}}

    def _tasks__add_or_update_artifacts(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        arts = doc.setdefault("execution", {}).setdefault("artifacts", [])
        for a in body["artifacts"]:
            arts[:] = [x for x in arts if (x["key"], x.get("mode", "output")) != (a["key"], a.get("mode", "output"))]
            arts.append(copy.deepcopy(a))
        self._touch(doc)
        return {"updated": 1}

    def _tasks__delete_artifacts(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        arts = doc.setdefault("execution", {}).setdefault("artifacts", [])
        keys = {(a["key"], a.get("mode", "output")) for a in body["artifacts"]}
        before = len(arts)
        arts[:] = [x for x in arts if (x["key"], x.get("mode", "output")) not in keys]
        return {"deleted": before - len(arts)}

    def _tasks__add_or_update_model(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        entries = doc.setdefault("models", {}).setdefault(body["type"], [])
        entries[:] = [e for e in entries if e["name"] != body["name"]]
        entries.append({"name": body["name"], "model": body["model"]})
        if body.get("iteration") is not None:
            doc["last_iteration"] = max(int(doc.get("last_iteration") or 0), int(body["iteration"]))
        self._touch(doc)
        return {"updated": 1}

    def _tasks__delete_models(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        for m in body["models"]:
            entries = doc.setdefault("models", {}).setdefault(m["type"], [])
            entries[:] = [e for e in entries if e["name"] != m["name"]]
        return {"updated": 1}

    def _tasks__edit_hyper_params(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        self._task_editable(doc, body)
        hp = doc.setdefault("hyperparams", {})
        if body.get("replace_hyperparams") == "all":
            hp.clear()
        for item in body["hyperparams"]:
            section = hp.setdefault(item["section"], {})
            if body.get("replace_hyperparams") == "section":
                section.clear()
            section[item["name"]] = copy.deepcopy(item)
        self._touch(doc)
        return {"updated": 1}

    def _tasks__get_hyper_params(self, body: dict[str, Any]) -> dict[str, Any]:
        params = []
        for tid in body["tasks"]:
            doc = self._get(self.tasks, "task", tid)
            items = [v for sec in (doc.get("hyperparams") or {}).values() for v in sec.values()]
            params.append({"task": tid, "hyperparams": items})
        return {"params": params}

    def _tasks__edit_configuration(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.tasks, "task", body["task"])
        conf = doc.setdefault("configuration", {})
        if body.get("replace_configuration"):
            conf.clear()
        for item in body["configuration"]:
            conf[item["name"]] = copy.deepcopy(item)
        return {"updated": 1}

    # -- models -------------------------------------------------------------------------------
    def _models__create(self, body: dict[str, Any]) -> dict[str, Any]:
        mid = uuid.uuid4().hex
        doc = {k: copy.deepcopy(v) for k, v in body.items() if v is not None and k != "metadata"}
        doc.update({"id": mid, "created": _now(), "last_update": _now(), "user": "ckpt-track-test",
                    "company": "fake"})
        doc["metadata"] = {m["key"]: m for m in body.get("metadata") or []}
        doc.setdefault("tags", [])
        doc.setdefault("system_tags", [])
        self.models[mid] = doc
        return {"id": mid, "created": True}

    def _models__get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"models": self._query(list(self.models.values()), body)}

    def _models__get_by_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"model": copy.deepcopy(self._get(self.models, "model", body["model"]))}

    def _model_update(self, doc: dict[str, Any], body: dict[str, Any]) -> None:
        for k, v in body.items():
            if k in ("model", "metadata", "iteration", "override_model_id") or v is None:
                continue
            doc[k] = copy.deepcopy(v)
        if body.get("metadata") is not None:
            doc["metadata"] = {m["key"]: m for m in body["metadata"]}
        doc["last_update"] = _now()

    def _task_iteration(self, task_id: str | None, iteration: Any) -> None:
        # like the server: a model's iteration only raises its task's last_iteration
        if task_id in self.tasks and iteration is not None:
            task = self.tasks[task_id]
            task["last_iteration"] = max(int(task.get("last_iteration") or 0), int(iteration))

    def _models__edit(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.models, "model", body["model"])
        self._model_update(doc, body)
        self._task_iteration(doc.get("task"), body.get("iteration"))
        return {"updated": 1, "fields": {}}

    def _models__update(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._models__edit(body)

    def _models__set_ready(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.models, "model", body["model"])
        doc["ready"] = True
        return {"updated": 1, "published_task": None}

    def _models__update_for_task(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self._get(self.tasks, "task", body["task"])
        if body.get("override_model_id"):
            mid = body["override_model_id"]
            doc = self._get(self.models, "model", mid)
            created = False
        else:
            mid = uuid.uuid4().hex
            doc = {"id": mid, "created": _now(), "user": "ckpt-track-test", "company": "fake", "tags": [],
                   "system_tags": [], "metadata": {}, "ready": False, "project": task.get("project"),
                   "framework": None, "design": {}, "labels": {}}
            self.models[mid] = doc
            created = True
        doc["task"] = task["id"]
        self._model_update(doc, {k: v for k, v in body.items() if k != "task"})
        doc.setdefault("name", body.get("name") or task.get("name"))
        entries = task.setdefault("models", {}).setdefault("output", [])
        name = body.get("name") or doc.get("name")
        entries[:] = [e for e in entries if e["name"] != name]
        entries.append({"name": name, "model": mid})
        return {"id": mid, "created": created, "updated": 1, "fields": {}}

    def _models__add_or_update_metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.models, "model", body["model"])
        if body.get("replace_metadata"):
            doc["metadata"] = {}
        meta = doc.setdefault("metadata", {})
        for item in body["metadata"]:
            meta[item["key"]] = copy.deepcopy(item)
        doc["last_update"] = _now()
        return {"updated": 1}

    def _models__delete_metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.models, "model", body["model"])
        for key in body["keys"]:
            (doc.get("metadata") or {}).pop(key, None)
        return {"updated": 1}

    def _models__delete(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = self._get(self.models, "model", body["model"])
        del self.models[doc["id"]]
        # like the server: the creating task no longer lists it among its outputs
        for task in self.tasks.values():
            for kind in ("input", "output"):
                entries = (task.get("models") or {}).get(kind) or []
                entries[:] = [e for e in entries if e.get("model") != doc["id"]]
        return {"deleted": True, "url": doc.get("uri")}

    # -- events ---------------------------------------------------------------------------------
    def events_batch(self, lines: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            self.calls.append("events.add_batch")
            self.events.extend(lines)
        return {"added": len(lines), "errors": 0, "errors_info": {}}

    def _events__add(self, body: dict[str, Any]) -> dict[str, Any]:
        self.events.append(body)
        return {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeClearmlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and
        # delayed ACKs add ~40 ms to every keep-alive request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server_fake._lock:
            self.server_fake._conns.add(self.connection)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, OSError):
            pass  # a dropped keep-alive connection: normal, not a test failure
        finally:
            with self.server_fake._lock:
                self.server_fake._conns.discard(self.connection)

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _envelope(self, endpoint: str, code: int, subcode: int, msg: str, data: Any) -> None:
        meta = {"id": uuid.uuid4().hex, "trx": uuid.uuid4().hex,
                "endpoint": {"name": endpoint, "requested_version": API_VERSION, "actual_version": "1.0"},
                "result_code": code, "result_subcode": subcode, "result_msg": msg, "error_stack": ""}
        self._send(code, json.dumps({"meta": meta, "data": data}).encode())

    def _endpoint(self) -> str | None:
        path = urlsplit(self.path).path
        m = re.fullmatch(r"(?:/v\d+\.\d+)?/([a-z_]+\.[a-z_]+)", path)
        return m.group(1) if m else None

    # -- methods ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path.startswith("/files/"):
            return self._file_get()
        return self._api()

    def do_POST(self) -> None:
        if self.path.startswith("/files/") or self.path == "/files":
            return self._file_post()
        return self._api()

    def do_DELETE(self) -> None:
        key = unquote(urlsplit(self.path).path[len("/files/"):]).strip("/")
        with self.server_fake._lock:
            found = self.server_fake.files.pop(key, None) is not None
        self._send(200 if found else 404, b"{}")

    def _api(self) -> None:
        fake = self.server_fake
        endpoint = self._endpoint()
        raw = self._body()
        if endpoint is None:
            return self._send(404, b"not found", "text/plain")
        if endpoint == "auth.login":
            auth = self.headers.get("Authorization", "")
            good = "Basic " + base64.b64encode(f"{fake.access_key}:{fake.secret_key}".encode()).decode()
            if not hmac.compare_digest(auth, good):
                return self._envelope(endpoint, 401, 20, "Unauthorized (invalid credentials) (failed to locate "
                                      "provided credentials)", {})
        elif not fake.token_ok(self.headers.get("Authorization", "")):
            return self._envelope(endpoint, 401, 21, "Unauthorized (missing credentials)", {})
        try:
            if endpoint == "events.add_batch":
                lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
                data = fake.events_batch(lines)
            else:
                body = json.loads(raw) if raw else {}
                data = fake.handle(endpoint, body)
        except ApiError as exc:
            return self._envelope(endpoint, exc.code, exc.subcode, exc.msg, {})
        except (KeyError, TypeError, ValueError) as exc:
            return self._envelope(endpoint, 400, 12, f"Validation error: {type(exc).__name__}: {exc}", {})
        self._envelope(endpoint, 200, 0, "OK", data)

    def _file_get(self) -> None:
        key = unquote(urlsplit(self.path).path[len("/files/"):]).strip("/")
        with self.server_fake._lock:
            data = self.server_fake.files.get(key)
        if data is None:
            return self._send(404, b"file not found", "text/plain")
        self._send(200, data, "application/octet-stream")

    def _file_post(self) -> None:
        # the SDK posts multipart/form-data: one part per file, the field name is the path
        folder = unquote(urlsplit(self.path).path[len("/files"):]).strip("/")
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        stored = []
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            key = "/".join(x.strip("/") for x in (folder, str(name)) if x.strip("/"))
            with self.server_fake._lock:
                self.server_fake.files[key] = payload
                self.server_fake.uploads.append((key, len(payload)))
            stored.append(key)
        self._send(200, json.dumps({"uploaded": stored}).encode())
