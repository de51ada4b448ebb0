"""ClearML test support: the loopback fake server, the SDK environment around it, and a
reader for the offline sessions the real SDK writes.

Nothing here patches the SDK: the SDK runs its own code against
:class:`~tests.fakes.clearml_server.FakeClearmlServer` over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .clearml_server import FakeClearmlServer

__all__ = ["CONFIG_FILE", "FakeClearmlServer", "OfflineSession", "close_current_task", "forget_master_process",
           "sdk_env"]

CONFIG_FILE = Path(__file__).resolve().parents[2] / "backends" / "clearml.conf"
WEB_HOST = "http://localhost:8080"  # a self-hosted web UI address; only used to build links
CLOSE_TIMEOUT_S = 120.0  # generous: with backends/clearml.conf close() takes well under a second


@contextmanager
def sdk_env(server: FakeClearmlServer, home: Path) -> Iterator[dict[str, str]]:
    """Point the SDK at ``server`` with ``home`` for its home, cache and offline folders."""
    env = {
        "CLEARML_CONFIG_FILE": str(CONFIG_FILE),
        "CLEARML_API_HOST": server.api_host,
        "CLEARML_WEB_HOST": WEB_HOST,
        "CLEARML_FILES_HOST": server.files_host,
        "CLEARML_API_ACCESS_KEY": server.access_key,
        "CLEARML_API_SECRET_KEY": server.secret_key,
        "CLEARML_CACHE_DIR": str(home / "clearml-cache"),
        "HOME": str(home),  # the SDK keeps ~/.clearml/.session.json
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forget_master_process() -> None:
    """``Task.init`` marks this process as a task's master in the environment (both names); a child
    process inheriting that takes itself for a worker of that task and gets a stub from its own
    ``Task.init``. Tests that spawn processes must not leave it behind."""
    for key in ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"):
        os.environ.pop(key, None)


def close_current_task(timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close the process's main ClearML task, failing (not hanging) if ``close()`` stalls,
    e.g. on the SDK's 300 s repository-detection wait."""
    from clearml import Task

    task = Task.current_task()
    if task is None:
        return
    closer = threading.Thread(target=task.close, name="clearml-close", daemon=True)
    closer.start()
    closer.join(timeout)
    assert not closer.is_alive(), (
        f"Task.close() did not return within {timeout:.0f} s; is CLEARML_CONFIG_FILE={CONFIG_FILE} "
        "(vcs_repo_detect_async: false) in effect?")


class OfflineSession:
    """Read what the SDK wrote for an offline task: ``task.json``, ``metrics.jsonl`` and the
    artifact files, from the session zip (``<cache>/offline/<task_id>.zip``)."""

    def __init__(self, archive: Path) -> None:
        self.archive = Path(archive)
        with zipfile.ZipFile(self.archive) as zf:
            self.names = zf.namelist()
            self.task: dict[str, Any] = json.loads(zf.read("task.json"))
            self.metrics: list[dict[str, Any]] = []
            if "metrics.jsonl" in self.names:
                for line in zf.read("metrics.jsonl").decode().splitlines():
                    if line.strip():  # each line is a JSON list of events
                        self.metrics.extend(json.loads(line))

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return {a["key"]: a for a in self.task["execution"].get("artifacts") or []}

    def artifact_metadata(self, key: str) -> dict[str, str]:
        return {k: v for k, v in self.artifacts[key].get("display_data") or []}

    def artifact_files(self, key: str) -> dict[str, bytes]:
        """The files of a folder artifact (stored by the SDK as a zip inside the session zip)."""
        uri = self.artifacts[key]["uri"]
        member = os.path.relpath(uri, self.task["offline_folder"])
        with zipfile.ZipFile(self.archive) as outer, outer.open(member) as inner_raw:
            data = inner_raw.read()
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return {n: inner.read(n) for n in inner.namelist() if not n.endswith("/")}

    def artifact_file(self, key: str) -> bytes:
        """The bytes of a single-file artifact (stored by the SDK as is)."""
        member = os.path.relpath(self.artifacts[key]["uri"], self.task["offline_folder"])
        with zipfile.ZipFile(self.archive) as outer:
            return outer.read(member)

    def user_properties(self) -> dict[str, str]:
        props = (self.task.get("hyperparams") or {}).get("properties") or {}
        return {k: v["value"] for k, v in props.items()}

    def scalars(self) -> list[tuple[str, str, int, float]]:
        return [(e["metric"], e["variant"], e["iter"], e["value"]) for e in self.metrics
                if e.get("type") == "training_stats_scalar"]
