"""A small client of the ClearML REST API, over the SDK's own ``Session`` (its login, config and
retries), for what the SDK's objects do slowly or not at all: reads of a task's artifacts and
models, lookups by name or run-id tag, and edits of a finished task or of model tags.

Before the first call (and again after the server was lost) it checks that the API host
answers at all: the SDK would otherwise retry for minutes, and a lost server must fail fast.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ...boundary import sdk_errors
from ...errors import CheckpointNotFound, CkptTrackError, ConfigError
from . import _compat
from .metadata import HEX, RUN_TAG, Item, artifact_items, model_item, stored_blobs, user_properties
from .sdk import ApiFailure, configured_api_host, is_unreachable, probe, sdk, session_kwargs, translate

__all__ = ["Api"]

_PROBE_EVERY_S = 5.0  # cheap, and it spares a lost server hours of SDK retries
_PAGE = 500
_NO_SERVER = ("no ClearML server is configured: set CLEARML_API_HOST (e.g. http://127.0.0.1:8008) with "
              "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, or api.api_server in clearml.conf "
              "(clearml-init); for the hosted service set CLEARML_API_HOST=https://api.clear.ml")


class Api:
    """The server of this process's ClearML configuration."""

    def __init__(self, web_host: str | None = None, force_online: bool = False) -> None:
        self.web_host = web_host
        self.force_online = force_online  # [clearml] offline = false: it overrides CLEARML_OFFLINE_MODE
        self._session: Any = None
        self._probed = -1e9

    # -- errors ----------------------------------------------------------------------------
    def translate(self, exc: Exception, doing: str) -> CkptTrackError:
        """:func:`sdk.translate`, and a lost server is probed again before the next call."""
        if is_unreachable(exc):
            self._probed = -1e9
        return translate(exc, doing)

    def boundary(self, doing: str) -> Any:
        """The SDK error boundary (``boundary.sdk_errors``) with this backend's table."""
        return sdk_errors(self.translate, doing)

    # -- the session -------------------------------------------------------------------------
    def connect(self) -> Any:
        """The SDK's HTTP session (online reads and small edits), after a reachability check."""
        sdk()
        from clearml import Task
        from clearml.backend_api import Session

        if Task.is_offline() and self.force_online:
            Task.set_offline(False)
        if Task.is_offline():
            raise ConfigError("this needs the ClearML server, but ClearML offline mode is on "
                              "(CLEARML_OFFLINE_MODE or [clearml] offline); turn it off to read online runs")
        if configured_api_host() is None:  # never fall back on the vendor's public server
            raise ConfigError(_NO_SERVER)
        if time.monotonic() - self._probed > _PROBE_EVERY_S:
            probe(Session.get_api_server_host())
            self._probed = time.monotonic()
        if self._session is None:
            from ...network import current

            session = Session(**session_kwargs())
            _compat.set_request_timeout(session, current().attempt_timeout)
            self._session = session
        return self._session

    @property
    def host(self) -> str:
        return str(self.connect().host)

    def call(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``service.action`` with a JSON body; its ``data``, or ``ApiFailure``."""
        service, _, action = endpoint.partition(".")
        res = self.connect().send_request(service, action, json=dict(body))
        try:
            payload = res.json()
        except ValueError:
            payload = {}
        meta = payload.get("meta") or {}
        if res.status_code != 200:
            raise ApiFailure(endpoint, res.status_code, int(meta.get("result_subcode") or 0),
                             str(meta.get("result_msg") or res.reason))
        return payload.get("data") or {}

    def web(self) -> str:
        """The base of web-UI links: ``[clearml] web_host``, else the SDK's web server."""
        if self.web_host is None:
            from clearml.backend_api import Session

            self.web_host = Session.get_app_server_host().rstrip("/")
        return self.web_host

    # -- queries -------------------------------------------------------------------------------
    def lookup(self, project: str, run_id: str | None, name: str | None) -> dict[str, Any] | None:
        """The newest unarchived task of ``project`` with that run id (a 32-hex one is the task
        id itself) or else that name; None when there is none."""
        fields = ["id", "name", "project", "system_tags", "last_update"]
        if run_id and re.fullmatch(HEX, run_id):
            rows = self.call("tasks.get_all", {"id": [run_id], "only_fields": fields})["tasks"]
        elif run_id or name:
            projects = self.call("projects.get_all", {"name": f"^{re.escape(project)}$", "only_fields": ["id"]})
            if not projects["projects"]:
                return None
            query: dict[str, Any] = {"project": [p["id"] for p in projects["projects"]], "only_fields": fields,
                                     "order_by": ["-last_update"]}
            query.update({"system_tags": [RUN_TAG + run_id]} if run_id else {"name": f"^{re.escape(str(name))}$"})
            rows = self.call("tasks.get_all", query)["tasks"]
        else:
            return None
        rows = [r for r in rows if "archived" not in (r.get("system_tags") or [])]
        return rows[0] if rows else None

    def task(self, task_id: str) -> dict[str, Any] | None:
        """A task's document with its project's name, or None."""
        rows = self.call("tasks.get_all", {"id": [task_id]})["tasks"]
        if not rows:
            return None
        row = rows[0]
        if row.get("project"):
            projects = self.call("projects.get_all", {"id": [row["project"]], "only_fields": ["id", "name"]})
            row["project_name"] = next((p["name"] for p in projects["projects"]), "")
        return row

    def checkpoints(self, task_id: str, what: str) -> tuple[list[Item], dict[str, str], dict[str, Any]]:
        """(checkpoints, user properties, stored tensor files) of a task."""
        rows = self.call("tasks.get_all", {"id": [task_id], "only_fields": ["id", "hyperparams",
                                                                            "execution.artifacts"]})
        if not rows["tasks"]:
            raise CheckpointNotFound(f"{what}: the ClearML task {task_id} no longer exists")
        doc = rows["tasks"][0]
        items, page = artifact_items(doc), 0
        while True:  # paged, like the SDK's own queries
            batch = self.call("models.get_all", {"task": [task_id], "page": page, "page_size": _PAGE,
                                                 "only_fields": ["id", "tags", "metadata", "uri", "task"]})["models"]
            items.extend(i for r in batch if (i := model_item(r)))
            if len(batch) < _PAGE:
                break
            page += 1
        return items, user_properties(doc), stored_blobs(doc)

    def model(self, model_id: str) -> dict[str, Any] | None:
        rows = self.call("models.get_all", {"id": [model_id], "only_fields": ["id", "task", "metadata"]})["models"]
        return rows[0] if rows else None

    def model_exists(self, model_id: str) -> bool:
        return bool(self.call("models.get_all", {"id": [model_id], "only_fields": ["id"]})["models"])

    # -- edits ---------------------------------------------------------------------------------
    def edit_properties(self, task_id: str, props: Mapping[str, str]) -> None:
        """Set user properties of any task, a finished one too (as the web UI may)."""
        self.call("tasks.edit_hyper_params", {"task": task_id, "force": True, "hyperparams": [
            {"section": "properties", "name": k, "value": v, "type": "str"} for k, v in props.items()]})

    def set_tags(self, model_id: str, tags: Sequence[str]) -> None:
        self.call("models.edit", {"model": model_id, "tags": list(tags)})

    def untag(self, models: Sequence[Item], aliases: set[str], keep: str | None = None) -> None:
        """Take ``aliases`` off every model of ``models`` but ``keep``: an alias names one checkpoint."""
        for item in models:
            if item.kind == "model" and item.key != keep and aliases & set(item.tags):
                self.set_tags(item.key, [t for t in item.tags if t not in aliases])
