"""The ClearML tasks this backend writes to, and how it gets them.

ClearML allows one ``Task.init`` per process (the "main" task, which also captures the
console and the scalars); ``ct.init`` uses the one the user already made, or makes it, and a
second run in the same process gets ``Task.create``.  Tasks ckpt_track created or re-opened are
closed by ``finish_run``; the user's own task is flushed and left open for the user to close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import BackendError, ConfigError
from ...format import LocalCheckpoint
from ...records import RunInfo, RunSpec
from .metadata import BLOB, RUN_TAG
from .sdk import detect_repository, task_init

__all__ = ["OpenTask", "Tasks", "upload_blobs"]


@dataclass
class OpenTask:
    """A task this backend writes to."""

    task: Any
    owned: bool  # created or re-opened by us, so finish_run closes it
    main: bool  # opened with Task.init (the process's main task)
    restore_offline: bool | None = None  # offline mode as it was before we turned it on


class Tasks:
    """The tasks this process holds open, by task id."""

    def __init__(self, output_uri: str | None, detect_repository: bool | None = None) -> None:
        self.output_uri = output_uri
        self.detect_repository = detect_repository  # [clearml] detect_repository (None: sdk.detect_repository)
        self.open: dict[str, OpenTask] = {}

    def _init(self, **kwargs: Any) -> Any:
        return task_init(detect_repo=detect_repository(self.detect_repository), **kwargs)

    def held(self, task_id: str) -> OpenTask | None:
        """The open task ``task_id``: one of ours, or the process's main task when it is that."""
        if task_id in self.open:
            return self.open[task_id]
        from clearml import Task

        current = Task.current_task()
        return OpenTask(current, owned=False, main=True) if current is not None and current.id == task_id else None

    def attach(self, row: dict[str, Any]) -> OpenTask:
        """Continue the existing task ``row`` (a server row) for writing."""
        from clearml import Task

        tid, current = row["id"], Task.current_task()
        if tid in self.open:
            return self.open[tid]
        if current is not None and current.id == tid:
            op = OpenTask(current, owned=False, main=True)
        elif current is None:
            task = self._init(task_name=row.get("name"), continue_last_task=tid, output_uri=self.output_uri or True)
            task.set_initial_iteration(0)  # scalars are reported at the real step, not offset by ClearML
            op = OpenTask(task, owned=True, main=True)
        else:
            task = Task.get_task(task_id=tid)
            task.mark_started(force=True)
            op = OpenTask(task, owned=True, main=False)
        self.open[tid] = op
        return op

    def create(self, spec: RunSpec, project: str) -> OpenTask:
        """A new online task for ``spec`` (or the user's own main task, when ``spec`` names none)."""
        from clearml import Task

        current = Task.current_task()
        if current is not None and spec.run_id is None and spec.name is None:
            op = OpenTask(current, owned=False, main=True)  # the user's own Task.init: log into it
        elif current is None:
            task = self._init(project_name=project, task_name=spec.name or spec.run_id, reuse_last_task_id=False,
                             output_uri=self.output_uri or True)
            op = OpenTask(task, owned=True, main=True)
        else:  # a second run in this process: ClearML allows one Task.init per process
            task = Task.create(project_name=project, task_name=spec.name or spec.run_id or "ckpt_track run",
                               add_task_init_call=False, detect_repository=False)
            task.output_uri = self.output_uri or True
            task.mark_started(force=True)
            op = OpenTask(task, owned=True, main=False)
        return self.adopt(op, spec)

    def create_offline(self, spec: RunSpec, project: str) -> OpenTask:
        """A new offline session for ``spec`` (or the process's offline main task)."""
        from clearml import Task

        current = Task.current_task()
        if current is not None:
            if str(current.id).startswith("offline-") and spec.run_id is None and spec.name is None:
                return self.adopt(OpenTask(current, owned=False, main=True), spec)
            raise ConfigError("ClearML offline mode allows one task per process and one is open; "
                              "finish the other run first")
        was = bool(Task.is_offline())
        Task.set_offline(True)
        task = self._init(project_name=project, task_name=spec.name or spec.run_id, reuse_last_task_id=False)
        return self.adopt(OpenTask(task, owned=True, main=True, restore_offline=was), spec)

    def adopt(self, op: OpenTask, spec: RunSpec) -> OpenTask:
        """Mark a new task as ours (and with the user's run id), record the config, hold it."""
        if op.owned:
            tags = ["ckpt_track", *([RUN_TAG + spec.run_id] if spec.run_id else [])]
            op.task.set_system_tags(sorted(set(op.task.get_system_tags() or []) | set(tags)))
        if spec.config:
            op.task.connect(dict(spec.config), name="config")
        self.open[op.task.id] = op
        return op

    def finish(self, task_id: str) -> None:
        """Flush and (when it is ours) close the task; the SDK's offline mode is put back."""
        op = self.open.pop(task_id, None)
        if op is None:
            return
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


def upload_blobs(op: OpenTask, run: RunInfo, ckpt: LocalCheckpoint, names: Sequence[str]) -> None:
    """Store each tensor file of ``names`` as a task artifact of its own (online and offline)."""
    for fname in names:
        if not op.task.upload_artifact(BLOB + fname, artifact_object=str(ckpt.path / fname), wait_on_upload=True):
            raise BackendError(f"ClearML did not store {fname} of step {ckpt.step} in {run.ref}")
