"""A loopback fake of the Comet server, so the real ``comet_ml`` SDK runs its own code.

Only the HTTP boundary is faked: ``Experiment`` / ``ExistingExperiment`` (handshake,
heartbeat, batched metrics, multipart asset uploads, log-other), ``comet upload``
(``OfflineSender``), ``API`` / ``APIExperiment`` reads, asset download and delete,
and the model registry.  Endpoints and payloads follow what comet_ml 3.58 sends
(read from its ``connection/`` and ``api.py``); answers carry the fields the SDK
parses.  Requests the fake does not model are recorded in ``unhandled`` and
answered ``200 {}`` (POST) or ``404`` (GET), so a test can assert nothing new
was called.

    fake = FakeComet().start()
    os.environ["COMET_URL_OVERRIDE"] = fake.clientlib_url
    ...
    fake.stop()
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["API_KEY", "FakeAsset", "FakeComet", "FakeExperiment"]

API_KEY = "fakecometapikey0123456789abcdef00"
BACKEND_VERSION = "3.53.0"  # modern enough for the SDK's new registry API (>= 3.5.42)
_API_KEY_NOT_REGISTERED = 90212  # comet_ml.exceptions codes the SDK maps to exceptions
_NO_WRITE_ACCESS_TO_EXPERIMENT = 90210
_EXPERIMENT_ALREADY_EXISTS = 90999


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class FakeAsset:
    asset_id: str
    file_name: str
    data: bytes
    type: str
    model: str | None  # groupingName: the experiment model it belongs to
    step: int | None
    metadata: str | None  # Comet stores and returns asset metadata as a JSON string
    created: int = field(default_factory=_now_ms)


@dataclass
class FakeExperiment:
    key: str
    workspace: str
    project: str
    name: str | None = None
    alive: bool = True
    offline: bool = False
    created: int = field(default_factory=_now_ms)
    others: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    assets: dict[str, FakeAsset] = field(default_factory=dict)

    def models(self) -> dict[str, list[FakeAsset]]:
        out: dict[str, list[FakeAsset]] = {}
        for a in self.assets.values():
            if a.type == "model-element" and a.model:
                out.setdefault(a.model, []).append(a)
        return out


class _Reply(Exception):
    """Raised by a handler to answer with an error status."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class FakeComet:
    """In-memory Comet: experiments, assets, others, metrics and a model registry."""

    def __init__(self, api_key: str = API_KEY, workspace: str = "ws") -> None:
        self.api_key = api_key
        self.default_workspace = workspace
        self.experiments: dict[str, FakeExperiment] = {}
        self.registry: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lose_uploads: set[str] = set()  # file names whose upload is answered 200 but dropped
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._get: dict[str, Callable[[dict[str, str]], Any]] = {
            "/clientlib/isAlive/ver": lambda q: {"msg": "alive", "version": BACKEND_VERSION},
            "/clientlib/health/ping": lambda q: {"msg": "pong"},
            "/api/rest/v2/account-details": lambda q: {"userName": "tester", "defaultWorkspaceName": self.default_workspace},
            "/api/rest/v2/experiment/metadata": lambda q: self._metadata(self._exp(q)),
            "/api/rest/v2/experiments": self._experiments,
            "/api/rest/v2/experiment/model": self._models,
            "/api/rest/v2/experiment/model/asset/list": self._model_assets,
            "/api/rest/v2/experiment/asset/list": self._asset_list,
            "/api/rest/v2/experiment/log-other": self._others,
            "/api/rest/v2/experiment/tags": lambda q: {"tags": list(self._exp(q).tags)},
            "/api/rest/v2/write/experiment/asset/delete": self._delete_asset,
            "/api/rest/v2/registry-model": self._registry_models,
            "/api/rest/v2/registry-model/details": self._registry_details,
        }
        self._post: dict[str, Callable[[dict[str, str], Any], Any]] = {
            "/clientlib/logger/add/run": self._add_run,
            "/clientlib/logger/get/run": self._get_run,
            "/clientlib/asset/3d-limits": lambda q, b: {},
            "/clientlib/status-report/update": self._status,
            "/clientlib/status-report/offline-metadata": lambda q, b: {},
            "/clientlib/notification/experiment": lambda q, b: {},
            "/clientlib/notify/event": lambda q, b: {},
            "/clientlib/tags/add-tags-to-experiment": self._add_tags,
            "/clientlib/batch/logger/experiment/metric": self._batch_metrics,
            "/clientlib/batch/logger/experiment/parameter": self._batch_params,
            "/clientlib/asset/upload": self._upload,
            "/api/rest/v2/write/experiment/log-other": self._log_other,
            "/api/rest/v2/write/experiment/update-status": lambda q, b: {},
            "/api/rest/v2/write/registry-model/item/create": self._register,
        }

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> FakeComet:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-comet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def reset(self) -> None:
        with self._lock:
            self.experiments.clear()
            self.registry.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.lose_uploads.clear()

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:40123`` (what a self-hosted UI URL starts with)."""
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def clientlib_url(self) -> str:
        """The value for ``COMET_URL_OVERRIDE``."""
        return f"{self.url}/clientlib/"

    # -- helpers ----------------------------------------------------------------------
    def experiment(self, key: str) -> FakeExperiment:
        return self.experiments[key]

    def _exp(self, q: dict[str, str], key_field: str = "experimentKey") -> FakeExperiment:
        key = q.get(key_field) or q.get("experimentId") or ""
        exp = self.experiments.get(key)
        if exp is None:
            raise _Reply(404, {"msg": f"experiment {key!r} not found", "code": 404})
        return exp

    def _metadata(self, exp: FakeExperiment) -> dict[str, Any]:
        return {
            "experimentKey": exp.key, "experimentName": exp.name, "projectName": exp.project,
            "projectId": f"pid-{exp.workspace}-{exp.project}", "workspaceName": exp.workspace,
            "durationMillis": 0, "startTimeMillis": exp.created, "endTimeMillis": exp.created,
            "archived": False, "running": exp.alive, "throttle": False, "filePath": None, "fileName": None,
            "optimizationId": None,
        }

    def _asset_json(self, exp: FakeExperiment, a: FakeAsset) -> dict[str, Any]:
        link = f"{self.url}/api/rest/v2/experiment/asset/get-asset?assetId={a.asset_id}&experimentKey={exp.key}"
        return {
            "fileName": a.file_name, "fileSize": len(a.data), "runContext": None, "step": a.step,
            "remote": False, "link": link, "compressedAssetLink": link, "s3Link": None,
            "createdAt": a.created, "dir": f"models/{a.model}" if a.model else "assets",
            "canView": False, "audio": False, "video": False, "histogram": False, "image": False,
            "type": a.type, "metadata": a.metadata, "assetId": a.asset_id, "tags": [],
            "experimentKey": exp.key,
        }

    # -- clientlib: the logging side ----------------------------------------------------
    def _add_run(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        key = body.get("experimentKey") or uuid.uuid4().hex
        with self._lock:
            exp = self.experiments.get(key)
            if exp is not None and not body.get("getOrCreateEnabled"):
                raise _Reply(400, {"msg": f"experiment {key} already exists", "sdk_error_code": _EXPERIMENT_ALREADY_EXISTS})
            if exp is None:
                exp = FakeExperiment(key, body.get("teamName") or self.default_workspace,
                                     body.get("projectName") or "general", offline=bool(body.get("offline")))
                self.experiments[key] = exp
        return self._handshake(exp)

    def _get_run(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self.experiments.get(body.get("previousExperiment") or "")
        if exp is None:
            raise _Reply(400, {"msg": "no such experiment or no write access", "sdk_error_code": _NO_WRITE_ACCESS_TO_EXPERIMENT})
        exp.alive = True
        return self._handshake(exp)

    def _handshake(self, exp: FakeExperiment) -> dict[str, Any]:
        return {"runId": uuid.uuid4().hex, "project_id": f"pid-{exp.workspace}-{exp.project}",
                "name": exp.name, "lastOffset": 0, "githubEnabled": False, "focusUrl": None,
                "s3DirectAccessEnabled": False, "featureToggles": []}

    def _status(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self.experiments.get(body.get("experimentKey") or "")
        if exp is not None:
            exp.alive = bool(body.get("is_alive"))
        return {"msg": "ok", "code": 200, "is_alive_beat_duration_millis": 60_000,
                "gpu_monitor_interval_millis": 60_000, "cpu_monitor_interval_millis": 60_000,
                "parameter_update_interval_millis": 60_000, "pending_rpcs": False}

    def _add_tags(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self._exp(body)
        exp.tags.extend(t for t in body.get("addedTags", []) if t not in exp.tags)
        return {}

    def _batch_metrics(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        self._exp(body).metrics.extend(body.get("values", []))
        return {}

    def _batch_params(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self._exp(body)
        for v in body.get("values", []):
            exp.params[v["parameterName"]] = v.get("parameterValue")
        return {}

    def _upload(self, q: dict[str, str], parts: Any) -> dict[str, Any]:
        exp = self._exp(q)
        if q.get("fileName") in self.lose_uploads:  # acknowledged but never stored: no SDK retries, no error
            return {"assetId": q.get("assetId"), "web": "", "api": ""}
        if "file" not in parts:
            raise _Reply(400, {"msg": "no file part"})
        step = q.get("step")
        meta = parts.get("metadata")
        asset = FakeAsset(
            asset_id=q.get("assetId") or uuid.uuid4().hex, file_name=q.get("fileName", "file"),
            data=parts["file"], type=q.get("type", "asset"), model=q.get("groupingName"),
            step=None if step in (None, "", "None") else int(step),
            metadata=meta.decode() if meta else None,
        )
        with self._lock:
            exp.assets[asset.asset_id] = asset
        return {"assetId": asset.asset_id, "web": "", "api": ""}

    def _log_other(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self._exp(body)
        exp.others[str(body["key"])] = body.get("value")
        if body.get("key") == "Name":
            exp.name = str(body.get("value"))
        return {}

    # -- REST: the reading side -----------------------------------------------------------
    def _experiments(self, q: dict[str, str]) -> dict[str, Any]:
        found = [self._metadata(e) for e in self.experiments.values()
                 if e.workspace == q.get("workspaceName") and e.project == q.get("projectName")]
        if not found:
            raise _Reply(404, {"msg": "project not found", "code": 404})
        return {"experiments": found}

    def _models(self, q: dict[str, str]) -> dict[str, Any]:
        exp = self._exp(q)
        return {"models": [{"experimentModelId": f"{exp.key}-{name}", "experimentKey": exp.key, "modelName": name}
                           for name in exp.models()]}

    def _model_assets(self, q: dict[str, str]) -> dict[str, Any]:
        exp = self._exp(q)
        return {"assets": [self._asset_json(exp, a) for a in exp.models().get(q.get("modelName", ""), [])]}

    def _asset_list(self, q: dict[str, str]) -> dict[str, Any]:
        exp = self._exp(q)
        kind = q.get("type")
        return {"assets": [self._asset_json(exp, a) for a in exp.assets.values() if kind in (None, "all", a.type)]}

    def _others(self, q: dict[str, str]) -> dict[str, Any]:
        exp = self._exp(q)
        return {"values": [{"name": k, "valueCurrent": v if isinstance(v, str) else json.dumps(v),
                            "valueMax": v, "valueMin": v, "timestampCurrent": exp.created, "editable": True}
                           for k, v in exp.others.items()]}

    def _delete_asset(self, q: dict[str, str]) -> dict[str, Any]:
        exp = self._exp(q)
        if exp.assets.pop(q.get("assetId", ""), None) is None:
            raise _Reply(404, {"msg": "asset not found", "code": 404})
        return {"msg": "deleted"}

    def get_asset(self, q: dict[str, str]) -> bytes:
        exp = self._exp(q)
        asset = exp.assets.get(q.get("assetId", ""))
        if asset is None:
            raise _Reply(404, {"msg": "asset not found", "code": 404})
        return asset.data

    # -- registry --------------------------------------------------------------------------
    def _register(self, q: dict[str, str], body: Any) -> dict[str, Any]:
        exp = self._exp(body)
        model = body.get("experimentModelName")
        if model not in exp.models():
            raise _Reply(400, {"msg": f"no experiment model {model!r}"})
        versions = self.registry.setdefault((exp.workspace, body["registryModelName"]), [])
        version = body.get("version") or "1.0.0"
        if any(v["version"] == version for v in versions):
            raise _Reply(400, {"msg": f"version {version} already exists"})
        item = {"registryModelItemId": uuid.uuid4().hex, "version": version, "comment": body.get("versionComment") or "",
                "stages": [], "tags": list(body.get("tags") or []), "status": body.get("status"),
                "userName": "tester", "createdAt": _now_ms(), "lastUpdated": _now_ms(),
                "experimentModel": {"experimentModelId": f"{exp.key}-{model}", "experimentModelName": model,
                                    "experimentKey": exp.key},
                "assetIds": [a.asset_id for a in exp.models()[model]]}
        versions.append(item)
        return {"registryModelItemId": item["registryModelItemId"]}

    def _registry_models(self, q: dict[str, str]) -> dict[str, Any]:
        return {"registryModels": [{"modelName": name, "workspaceName": ws}
                                   for ws, name in self.registry if ws == q.get("workspaceName")]}

    def _registry_details(self, q: dict[str, str]) -> dict[str, Any]:
        versions = self.registry.get((q.get("workspaceName", ""), q.get("modelName", "")))
        if versions is None:
            raise _Reply(404, {"msg": "registry model not found", "code": 404})
        out = []
        for item in versions:
            exp = self.experiments[item["experimentModel"]["experimentKey"]]
            assets = [self._asset_json(exp, exp.assets[i]) for i in item["assetIds"] if i in exp.assets]
            out.append({k: v for k, v in item.items() if k != "assetIds"} | {"assets": assets})
        return {"registryModelId": f"rm-{q.get('modelName')}", "modelName": q.get("modelName"),
                "description": "", "isPublic": False, "createdAt": 0, "lastUpdated": 0,
                "userName": "tester", "versions": out}

    # -- auth ---------------------------------------------------------------------------------
    def check_key(self, path: str, headers: Any, body: Any) -> None:
        if path in ("/clientlib/isAlive/ver", "/clientlib/health/ping"):
            return  # public, as on the real server
        given = [headers.get("Authorization")]
        if isinstance(body, dict):
            given += [body.get("apiKey"), body.get("api_key")]
        given = [g for g in given if g]
        if not given or all(g == self.api_key for g in given):
            return
        if path in ("/clientlib/logger/add/run", "/clientlib/logger/get/run"):
            raise _Reply(400, {"msg": "api key not registered", "sdk_error_code": _API_KEY_NOT_REGISTERED})
        raise _Reply(401, {"msg": "Invalid API key", "code": 401})


class _Handler(BaseHTTPRequestHandler):
    owner: FakeComet
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes; no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _read(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _body(self, raw: bytes) -> Any:
        if raw[:2] == b"\x1f\x8b":  # batched messages are gzipped
            raw = gzip.decompress(raw)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw, policy=email.policy.HTTP)
            return {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                    for p in msg.iter_parts()}
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def _send(self, status: int, payload: Any, ctype: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        fake = self.owner
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = self._read() if method == "POST" else b""
        body = self._body(raw) if method == "POST" else {}
        with fake._lock:
            fake.requests.append((method, path))
        try:
            fake.check_key(path, self.headers, body)
            if method == "GET" and path == "/api/rest/v2/experiment/asset/get-asset":
                return self._send(200, fake.get_asset(query), "application/octet-stream")
            table: dict[str, Any] = fake._get if method == "GET" else fake._post
            handler = table.get(path)
            if handler is None:
                with fake._lock:
                    fake.unhandled.append((method, path))
                return self._send(404 if method == "GET" else 200, {} if method == "POST" else {"msg": "unknown"})
            with fake._lock:
                result = handler(query) if method == "GET" else handler(query, body)
            self._send(200, result)
        except _Reply as reply:
            self._send(reply.status, reply.body)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")
