"""A pretend tracker SDK with the simplest artifact API there is, kept on a local directory.

It stands in for a vendor's client in the plugin example (``ckpt_track_tiny.py``) and its
tests: runs with string tags and metrics, and files uploaded under paths of a run.  Nothing
here knows about checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


class TinyError(Exception):
    """What the SDK raises; ``status`` as an HTTP API would give it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class TinyClient:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _run(self, run_id: str) -> Path:
        path = self.root / "runs" / run_id
        if not (path / "run.json").is_file():
            raise TinyError(404, f"run {run_id} not found")
        return path

    def create_run(self, project: str, name: str, params: dict[str, Any]) -> str:
        run_id = uuid.uuid4().hex[:12]
        path = self.root / "runs" / run_id
        (path / "files").mkdir(parents=True)
        (path / "run.json").write_text(json.dumps({"id": run_id, "project": project, "name": name,
                                                   "params": params, "tags": {}, "metrics": []}))
        return run_id

    def get_run(self, run_id: str) -> dict[str, Any]:
        return json.loads((self._run(run_id) / "run.json").read_text())

    def search_runs(self, project: str, name: str | None = None) -> list[dict[str, Any]]:
        runs = [json.loads(p.read_text()) for p in sorted((self.root / "runs").glob("*/run.json"))]
        return [r for r in runs if r["project"] == project and name in (None, r["name"])]

    def _update(self, run_id: str, key: str, value: Any) -> None:
        path = self._run(run_id) / "run.json"
        doc = json.loads(path.read_text())
        doc[key] = value(doc[key]) if callable(value) else value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._update(run_id, "tags", lambda tags: {**tags, key: value})

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None:
        self._update(run_id, "metrics", lambda rows: [*rows, [key, value, step]])

    def upload(self, run_id: str, local_file: str | Path, path: str) -> None:
        target = self._run(run_id) / "files" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_file, target)

    def list_files(self, run_id: str, prefix: str = "") -> dict[str, int]:
        base = self._run(run_id) / "files"
        return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and str(p.relative_to(base)).startswith(prefix)}

    def download(self, run_id: str, path: str, local_file: str | Path) -> None:
        source = self._run(run_id) / "files" / path
        if not source.is_file():
            raise TinyError(404, f"file {path} not found in run {run_id}")
        shutil.copyfile(source, local_file)

    def delete_file(self, run_id: str, path: str) -> None:
        (self._run(run_id) / "files" / path).unlink(missing_ok=True)
