"""The ClearML backend with the real ``clearml`` SDK.

Online, the SDK talks HTTP to a loopback fake of the ClearML API and file server
(``tests/fakes/clearml_server.py``): nothing in the SDK is patched.  Offline, the SDK
writes its real session folder and zip, which the tests open and read back.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

import ckpt_track as ct
from ckpt_track.backends.base import RunInfo, RunSpec
from ckpt_track.backends.clearml import ClearmlBackend
from ckpt_track.errors import AuthError, BackendUnavailable, CheckpointNotFound, ConfigError, InvalidRef
from ckpt_track.format import MANIFEST, Manifest, verify
from ckpt_track.testing.contract import BackendContract, make_checkpoint
from tests.fakes.clearml import WEB_HOST, FakeClearmlServer, OfflineSession, close_current_task, sdk_env

REPO = Path(__file__).resolve().parents[1]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clearml_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeClearmlServer]:
    """One fake server and one SDK environment for the session: the SDK keeps its config,
    login and host in process-wide state, so every test must see the same ones."""
    server = FakeClearmlServer().start()
    with sdk_env(server, tmp_path_factory.mktemp("clearml-home")):
        yield server
    server.stop()


@pytest.fixture
def clearml(clearml_server: FakeClearmlServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClearmlServer]:
    """Per test: SDK home and cache under tmp_path, online mode, and no task left open after."""
    from clearml import Task

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    Task.set_offline(False)
    clearml_server.calls.clear()
    # a hang (e.g. Task.close waiting 300 s on repository detection) fails the run instead of stalling it
    faulthandler.dump_traceback_later(300, exit=True)
    try:
        yield clearml_server
        assert clearml_server.unknown == [], f"the SDK called endpoints the fake lacks: {clearml_server.unknown}"
    finally:
        close_current_task()
        Task.set_offline(False)
        clearml_server.reject_auth = False
        faulthandler.cancel_dump_traceback_later()


class TestClearmlContract(BackendContract):
    @pytest.fixture
    def backend(self, clearml: FakeClearmlServer) -> ClearmlBackend:
        return ClearmlBackend({})

    @pytest.fixture
    def settings_overrides(self, clearml: FakeClearmlServer) -> dict[str, Any]:
        return {"backend": "clearml"}


def _model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- offline: the real SDK's session, read back ------------------------------------------------------
def test_offline_log_path_writes_every_checkpoint_into_the_session(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    losses = {10: 0.9, 20: 0.4, 30: 0.6}
    run = ct.init(project="offline-proj", name="offline-run", backend="clearml", monitor="val/loss",
                  settings={"clearml": {"offline": True}})
    assert run.id.startswith("offline-") and run.ref == ct.Ref("clearml", run.id)
    for step, loss in losses.items():
        with torch.no_grad():
            model.weight.add_(1.0)
        expected[step] = _model_weights(model)
        run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, epoch=step // 10)
    run.finish()
    # offline: no request reached the server (turning online mode back on at finish logs in again)
    assert set(clearml.calls) <= {"auth.login"}

    session = OfflineSession(tmp_path / "clearml-cache" / "offline" / f"{run.id}.zip")
    assert session.task["project_name"] == "offline-proj" and session.task["name"] == "offline-run"
    assert sorted(session.artifacts) == ["ckpt-v000001", "ckpt-v000002", "ckpt-v000003"]
    for version, (step, loss) in enumerate(losses.items(), 1):
        key = f"ckpt-v{version:06d}"
        meta = session.artifact_metadata(key)
        assert (meta["format"], meta["version"], meta["step"], meta["epoch"]) == ("ckpt_track/1", str(version),
                                                                                 str(step), str(step // 10))
        files = session.artifact_files(key)
        manifest = Manifest.from_json(__import__("json").loads(files[MANIFEST]))
        assert manifest.step == step and manifest.metrics == {"val/loss": loss}
        assert manifest.lineage["run"] == str(run.ref)
        assert manifest.lineage["parent"] == (None if version == 1 else f"{run.ref}@step={step - 10}")
        assert __import__("json").loads(meta["lineage"]) == manifest.lineage
        assert set(files) == {*manifest.files, MANIFEST}
        for name, entry in manifest.files.items():  # every file, byte for byte, as the manifest hashed it
            import xxhash

            assert len(files[name]) == entry.size and xxhash.xxh3_128(files[name]).hexdigest() == entry.hash
        tensors = load(files["tensors-00001-of-00001.safetensors"])
        assert all(torch.equal(tensors[f"model/{k}"], v) for k, v in expected[step].items())
    props = session.user_properties()
    aliases = __import__("json").loads(props["ckpt_track_aliases"])
    assert aliases == {"latest": 3, "best": 2, "step-10": 1, "step-20": 2, "step-30": 3}
    assert props["ckpt_track_last_version"] == "3"
    assert sorted(session.scalars()) == [("val", "loss", 10, 0.9), ("val", "loss", 20, 0.4), ("val", "loss", 30, 0.6)]

    # restorable by run and step, and by alias, from the session the SDK left behind
    fresh = torch.nn.Linear(4, 2)
    settings = ct.load_settings({"backend": "clearml"})
    got = ct.restore(f"clearml://{run.id}@step=20", model=fresh, settings=settings)
    assert got.step == 20 and torch.equal(fresh.weight, expected[20]["weight"])
    assert ct.restore(f"{run.id}@best", model=fresh, settings=settings).step == 20
    assert [s.step for s in ct.list_checkpoints(run.ref, settings)] == [10, 20, 30]


def test_offline_session_zip_alone_is_restorable(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    import shutil

    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="offline-proj", name="zip-only"))
    stored = be.put(run, make_checkpoint(tmp_path / "spool", 5, {"loss": 1.0}), ["latest", "step-5"])
    be.finish_run(run)
    folder = tmp_path / "clearml-cache" / "offline" / run.run_id
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(folder.with_suffix(".zip")), moved)
    shutil.rmtree(folder)
    reader = ClearmlBackend({"offline_dir": str(moved)})
    found = reader.find_run(run.ref)
    listed = reader.list(found)
    assert [(s.version, s.step, s.aliases) for s in listed] == [(1, 5, ("latest", "step-5"))]
    got = reader.get(listed[0], tmp_path / "dl")
    verify(got.path)
    assert got.manifest.step == 5 and stored.ref == listed[0].ref
    # the same through a reference that names the folder
    ref = f"clearml://{run.run_id}@step=5?offline_dir={moved}"
    assert ct.restore(ref, model=torch.nn.Linear(8, 4), settings=ct.load_settings({"backend": "clearml"})).step == 5


def test_offline_run_cannot_be_continued_and_says_how(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="offline-proj", run_id="crashy"))
    be.finish_run(run)
    with pytest.raises(ConfigError, match="import_offline_session"):
        ClearmlBackend({"offline": True}).open_run(RunSpec(project="offline-proj", run_id="crashy"))
    with pytest.raises(CheckpointNotFound):
        ClearmlBackend({"offline": True}).open_run(RunSpec(project="offline-proj", run_id="never-was", resume="must"))
    # find by <project>/<run id> among the sessions on disk
    assert ClearmlBackend({"offline": True}).find_run(ct.Ref("clearml", "offline-proj/crashy")).run_id == "crashy"
