"""``list_projects`` and ``list_runs`` of the local backend (``ckpt-track projects`` / ``runs``),
on a directory store and on an object store (fsspec's real in-memory file system)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from ckpt_track.backends.local import LocalBackend
from ckpt_track.errors import CheckpointNotFound
from ckpt_track.format import write_checkpoint
from ckpt_track.records import RunSpec


def _ckpt(tmp: Path, step: int):  # type: ignore[no-untyped-def]
    tensors = {"w": torch.full((4,), float(step))}
    return write_checkpoint(tmp, f"s{step}-{uuid.uuid4().hex[:6]}", tensors, {"step": step}, step=step)


@pytest.fixture(params=["dir", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> LocalBackend:
    root = str(tmp_path / "store") if request.param == "dir" else f"memory://ckpt-listing-{uuid.uuid4().hex[:8]}/s"
    return LocalBackend({"root": root})


def test_projects_and_runs_are_listed(backend: LocalBackend, tmp_path: Path) -> None:
    assert backend.list_projects() == []
    a = backend.open_run(RunSpec(project="resnet", name="first"))
    backend.put(a, _ckpt(tmp_path, 1), ["latest"])
    backend.put(a, _ckpt(tmp_path, 2), ["latest"])
    b = backend.open_run(RunSpec(project="resnet", name="second"))
    backend.open_run(RunSpec(project="bert", name="only"))

    assert backend.list_projects() == ["bert", "resnet"]
    runs = backend.list_runs("resnet")
    assert [(r.run_id, r.name) for r in runs] == [(a.run_id, "first"), (b.run_id, "second")]
    # each is what find_run returns, so the checkpoints of a listed run can be listed
    assert runs[0] == backend.find_run(a.ref)
    assert [s.step for s in backend.list(runs[0])] == [1, 2]
    assert backend.list(runs[1]) == []  # a run with no checkpoint yet is still a run of the store
    assert [r.name for r in backend.list_runs("bert")] == ["only"]


def test_an_unknown_project_names_the_known_ones(backend: LocalBackend) -> None:
    backend.open_run(RunSpec(project="resnet", name="first"))
    with pytest.raises(CheckpointNotFound, match="no project 'renset'.*projects there: resnet"):
        backend.list_runs("renset")
    with pytest.raises(CheckpointNotFound, match="projects there: resnet"):
        backend.list_runs("../etc")  # not even a valid name: still not found, never a path outside


def test_only_real_projects_are_listed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    be = LocalBackend({"root": str(root)})
    run = be.open_run(RunSpec(project="p", name="r"))
    (root / ".spool").mkdir()  # the writer's spool lives under the same root
    (root / "empty").mkdir()  # a project directory left with no run (only a lock)
    (root / "empty" / ".lock").write_text("")
    (root / "notes.txt").write_text("a stray file")
    assert be.list_projects() == ["p"]
    assert [r.run_id for r in be.list_runs("p")] == [run.run_id]


def test_an_object_store_does_not_list_its_shared_objects(tmp_path: Path) -> None:
    be = LocalBackend({"root": f"memory://ckpt-listing-{uuid.uuid4().hex[:8]}/s"})
    run = be.open_run(RunSpec(project="p", name="r"))
    be.put(run, _ckpt(tmp_path, 3))  # fills <prefix>/objects/
    assert be.list_projects() == ["p"]
    assert [r.run_id for r in be.list_runs("p")] == [run.run_id]
