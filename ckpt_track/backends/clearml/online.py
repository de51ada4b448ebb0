"""Runs on a ClearML server: each checkpoint is an ``OutputModel`` of the run's task (its own
files as one package zip, aliases as model tags), its tensor files task artifacts; read back
through the REST client and the SDK's ``Model`` / artifact downloads.

An imported offline session is an online task whose checkpoints are artifacts: those are
read, restored and deleted here too.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...format import LocalCheckpoint
from ...records import RunInfo, Stored
from .client import Api
from .metadata import BLOB, ClearmlCheckpoint, Item, State, blob_missing, own_files, parse_record
from .package import scratch_dir, unzip, zip_files
from .tasks import OpenTask

__all__ = ["Online", "model_comment"]


def model_comment(version: int, step: int, record: Mapping[str, str]) -> str:
    """The model's description in the UI: what it is and the exact commands that restore it."""
    lines = [f"ckpt_track checkpoint v{version} at step {step}"]
    if record.get("restore"):
        lines += ["", "Restore:", f"  {record['restore']}", f"  {record['restore_python']}"]
    return "\n".join(lines)


class Online:
    """Where the checkpoints of a run on the server live."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def ready(self) -> None:
        self.api.connect()

    def state(self, run: RunInfo, task_id: str) -> State:
        items, props, blobs = self.api.checkpoints(task_id, str(run.ref))
        return State(items, props, blobs)

    def reopen(self, run: RunInfo, task_id: str) -> OpenTask:
        """A finished (or another process's) task, to write to."""
        from clearml import Task

        self.api.connect()
        return OpenTask(Task.get_task(task_id=task_id), owned=False, main=False)

    def edit_props(self, run: RunInfo, task_id: str, props: Mapping[str, str]) -> None:
        """A task that is not open here (e.g. ``ckpt-track gc``): forced, as the UI may edit any task."""
        self.api.edit_properties(task_id, props)

    def store(self, op: OpenTask, run: RunInfo, ckpt: LocalCheckpoint, version: int, record: Mapping[str, str],
              aliases: Sequence[str], state: State, table: dict[str, int]) -> tuple[Item, dict[str, int]]:
        """Upload the checkpoint as a model tagged with ``aliases`` (taken off the others)."""
        model_id, uri = self._upload_model(op, ckpt, version, list(aliases), record)
        self.api.untag(state.items, set(aliases), keep=model_id)
        rec = parse_record(record)
        assert rec is not None
        return Item("model", model_id, rec, tuple(aliases), uri), table

    def _upload_model(self, op: OpenTask, ckpt: LocalCheckpoint, version: int, aliases: list[str],
                      record: Mapping[str, str]) -> tuple[str, str]:
        from clearml import OutputModel

        model = OutputModel(task=op.task, name=f"{op.task.name} v{version} step {ckpt.step}", tags=aliases,
                            framework="PyTorch", comment=model_comment(version, ckpt.step, record))
        tmp = scratch_dir(ckpt.path.parent)
        try:
            archive = tmp / f"ckpt-v{version:06d}.zip"
            zip_files(ckpt, own_files(ckpt.manifest), archive)
            # our own package zip + is_package: the SDK's update_weights_package leaves its temp zip
            # behind when uploading synchronously, and we are already off the training thread
            model.update_weights(weights_filename=str(archive), target_filename=archive.name, iteration=ckpt.step,
                                 is_package=True, auto_delete_file=False, async_enable=False, update_comment=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # metadata last: it is what marks the model as a committed checkpoint
        model.set_all_metadata({k: {"value": v, "type": "str"} for k, v in record.items()}, replace=True)
        return str(model.id), str(model.url)

    def handle(self, item: Item, task_id: str, state: State) -> ClearmlCheckpoint:
        url = f"{self.api.web()}/projects/*/models/{item.key}/general" if item.kind == "model" else None
        return ClearmlCheckpoint(item.kind, item.key, item.uri, item.record.blobs, task_id, url=url)

    def set_tags(self, state: State, stored: Stored, aliases: set[str]) -> None:
        """Move the model tags ``aliases`` onto ``stored`` (a model; artifacts have no tags)."""
        h: ClearmlCheckpoint = stored.native
        self.api.untag(state.items, aliases, keep=h.key)
        if h.kind == "model":
            mine = next(i for i in state.items if i.kind == "model" and i.key == h.key)
            self.api.set_tags(mine.key, sorted(set(mine.tags) | aliases))

    def remove_model(self, stored: Stored) -> None:
        """Delete a checkpoint's model and its package file; a model gone whose file stayed is a warning."""
        from clearml import Model

        h: ClearmlCheckpoint = stored.native
        self.api.connect()
        try:
            Model.remove(h.key, delete_weights_file=True, force=True, raise_on_errors=True)
        except ValueError:
            if self.api.model_exists(h.key):
                raise
            warnings.warn(f"clearml: {stored.ref} was deleted but its file {h.uri} could not be "
                          "removed from storage", stacklevel=3)

    def drop_files(self, uris: Sequence[str]) -> None:
        """Nothing: the server removed the artifacts' files with them."""

    def fetch_own(self, h: ClearmlCheckpoint, into: Path) -> None:
        """Unpack a checkpoint's own model package or artifact zip into ``into``."""
        self.api.connect()
        if h.kind == "model":
            from clearml import Model

            unzip(Model(model_id=h.key).get_weights(raise_on_error=True, extract_archive=False), into)
        else:
            from clearml import Task

            artifact = Task.get_task(task_id=h.task_id).artifacts[h.key]
            unzip(artifact.get_local_copy(extract_archive=False, raise_on_error=True), into)

    def fetch_blobs(self, stored: Stored, names: Sequence[str], into: Path) -> None:
        """Download the tensor files ``names`` from the task's artifacts into ``into``."""
        from clearml import Task

        tid = stored.native.task_id
        self.api.connect()
        artifacts = Task.get_task(task_id=tid).artifacts
        for fname in names:
            if BLOB + fname not in artifacts:
                raise blob_missing(stored.ref, fname, tid)
            # copied out of the SDK's download cache, which evicts files as it pleases
            local = artifacts[BLOB + fname].get_local_copy(extract_archive=False, raise_on_error=True)
            shutil.copyfile(local, into / fname)

