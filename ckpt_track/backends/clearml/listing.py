"""``list_projects`` / ``list_runs`` for ``ckpt-track projects`` and ``ckpt-track runs``.

The runs are the offline sessions on this machine (``[clearml] offline_dir`` and the SDK's
offline folder) that hold ckpt_track checkpoints and, when online with a server configured,
the server's tasks tagged ``ckpt_track`` that do.  Each is a :class:`RunInfo` as ``find_run``
returns it, so ``backend.list(info)`` works on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import CheckpointNotFound
from ...records import RunInfo
from .metadata import artifact_items
from .sdk import configured_api_host

if TYPE_CHECKING:
    from .backend import ClearmlBackend

__all__ = ["projects", "runs"]

_TAG = "ckpt_track"  # the system tag of the tasks ckpt_track created


def _sessions(backend: ClearmlBackend, project: str | None = None) -> list[dict[str, Any]]:
    return [d for d in backend.sessions.find(project=project) if artifact_items(d)]


def _online(backend: ClearmlBackend) -> bool:
    return not backend._offline_mode() and configured_api_host() is not None


def _server_projects(backend: ClearmlBackend) -> dict[str, str]:
    """Project id -> name of the server's projects holding ckpt_track tasks."""
    tasks = backend.api.call("tasks.get_all", {"system_tags": [_TAG], "only_fields": ["id", "project"]})["tasks"]
    ids = sorted({t["project"] for t in tasks if t.get("project")})
    if not ids:
        return {}
    rows = backend.api.call("projects.get_all", {"id": ids, "only_fields": ["id", "name"]})["projects"]
    return {p["id"]: p["name"] for p in rows}


def projects(backend: ClearmlBackend) -> list[str]:
    """Every project name with a ckpt_track run, sorted."""
    names = {str(d.get("project_name") or "") for d in _sessions(backend)}
    if _online(backend):
        names |= set(_server_projects(backend).values())
    return sorted(n for n in names if n)


def runs(backend: ClearmlBackend, project: str) -> list[RunInfo]:
    """The runs of ``project`` holding checkpoints: offline sessions (oldest written first),
    then the server's tasks (least recently updated first)."""
    found = [backend._run_info(d, True) for d in _sessions(backend, project)]
    known = bool(found)
    if _online(backend):
        pids = [pid for pid, name in _server_projects(backend).items() if name == project]
        known = known or bool(pids)
        if pids:
            rows = backend.api.call("tasks.get_all", {
                "project": pids, "system_tags": [_TAG], "order_by": ["last_update"],
                "only_fields": ["id", "name", "project", "system_tags", "last_update"]})["tasks"]
            for row in rows:
                if backend.api.checkpoints(row["id"], f"task {row['id']}")[0]:
                    found.append(backend._run_info({**row, "project_name": project}, True))
    if not known:
        listed = projects(backend)
        raise CheckpointNotFound(
            f"no ClearML project {project!r} with ckpt_track runs; known projects: "
            + (", ".join(listed) if listed else "none") + " (offline sessions in "
            + ", ".join(map(str, backend.sessions.dirs())) + ")")
    return found
