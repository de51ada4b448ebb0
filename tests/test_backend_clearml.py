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


# -- online: what the ClearML UI and a plain SDK client see --------------------------------------------
def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def test_online_checkpoints_are_native_clearml_models(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    from clearml import Model

    model = _small_model()
    with ct.init(project="native", name="native-run", backend="clearml", config={"lr": 0.1, "arch": {"depth": 2}},
                 monitor="val/loss") as run:
        for step, loss in ((10, 0.7), (20, 0.3), (30, 0.5)):
            with torch.no_grad():
                model.weight.mul_(1.5)
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss, "acc": 1 - loss})
    task = clearml.tasks[run.id]
    assert task["status"] == "completed" and "ckpt_track" in task["system_tags"]
    assert task["hyperparams"]["config"]["lr"]["value"] == "0.1"
    assert task["hyperparams"]["config"]["arch/depth"]["value"] == "2"
    props = {k: v["value"] for k, v in task["hyperparams"]["properties"].items()}
    assert props["ckpt_track_last_version"] == "3"  # survived the SDK's own edits at close()
    models = {m["metadata"]["step"]["value"]: m for m in clearml.models.values() if m.get("task") == run.id}
    assert sorted(models) == ["10", "20", "30"]
    assert sorted(models["30"]["tags"]) == ["latest", "step-30"]
    assert sorted(models["20"]["tags"]) == ["best", "step-20"]
    assert models["10"]["tags"] == ["step-10"] and "package" in models["10"]["system_tags"]
    assert models["20"]["framework"] == "PyTorch" and models["20"]["uri"].startswith(clearml.files_host)
    assert {e["model"] for e in task["models"]["output"]} == {m["id"] for m in models.values()}
    scalars = sorted((e["metric"], e["variant"], e["iter"], e["value"]) for e in clearml.scalars(run.id))
    assert scalars == sorted([("val", "loss", 10, 0.7), ("val", "loss", 20, 0.3), ("val", "loss", 30, 0.5),
                              ("acc", "acc", 10, 1 - 0.7), ("acc", "acc", 20, 1 - 0.3), ("acc", "acc", 30, 1 - 0.5)])
    # a plain ClearML user finds the best checkpoint by tag and gets the directory back
    found = Model.query_models(project_name="native", tags=["best"])
    assert [m.id for m in found] == [models["20"]["id"]]
    folder = Path(found[0].get_local_copy(raise_on_error=True))
    assert verify(folder).step == 20
    # the links ckpt_track hands out open the same run and checkpoint again
    stored = ct.list_checkpoints(run.ref, ct.load_settings({"backend": "clearml"}))
    assert ct.parse_ref(stored[1].native["url"]) == ct.Ref("clearml", f"models/{models['20']['id']}")
    assert ct.parse_ref(run._targets[0][1].native["url"]) == run.ref


def test_logs_into_the_users_own_task_and_leaves_it_open(clearml: FakeClearmlServer) -> None:
    from clearml import Task

    task = Task.init(project_name="mine", task_name="user-task", reuse_last_task_id=False)
    run = ct.init(project="mine", backend="clearml")
    assert run.id == task.id and not run.resumed
    run.log_checkpoint(1, model=_small_model(), metrics={"val/loss": 1.0})
    run.finish()
    assert clearml.tasks[task.id]["status"] == "in_progress"  # the user's task: the user closes it
    assert [s.step for s in ct.list_checkpoints(run.ref, ct.load_settings({"backend": "clearml"}))] == [1]


def test_resume_from_another_run_connects_an_input_model(clearml: FakeClearmlServer) -> None:
    settings = {"backend": "clearml"}
    with ct.init(project="lineage", name="parent", settings=settings) as parent:
        parent.log_checkpoint(3, model=_small_model(), metrics={"val/loss": 0.3})
    with ct.init(project="lineage", name="child", settings=settings) as child:
        assert child.resume(model=_small_model(1), ref=f"{parent.ref}@best") == 4
        child.log_checkpoint(4, model=_small_model())
    src = ct.list_checkpoints(parent.ref, ct.load_settings(settings))[0]
    task = clearml.tasks[child.id]
    assert [e["model"] for e in task["models"]["input"]] == [src.native["key"]]
    assert task["hyperparams"]["properties"]["ckpt_track_resumed_from"]["value"] == str(src.ref)
    mine = ct.list_checkpoints(child.ref, ct.load_settings(settings))[0]
    assert mine.lineage["resumed_from"] == str(src.ref)


def test_retention_deletes_models_and_their_files(clearml: FakeClearmlServer) -> None:
    settings = {"backend": "clearml", "retention": {"keep_last": 1, "keep_best": 1}}
    with ct.init(project="retention", name="r", settings=settings) as run:
        for step, loss in enumerate([0.5, 0.1, 0.4, 0.3]):
            run.log_checkpoint(step, model=_small_model(step), metrics={"val/loss": loss})
    kept = ct.list_checkpoints(run.ref, ct.load_settings(settings))
    assert [(s.version, s.step) for s in kept] == [(2, 1), (4, 3)]
    left = [m for m in clearml.models.values() if m.get("task") == run.id]
    assert sorted(m["metadata"]["version"]["value"] for m in left) == ["2", "4"]
    prefix = clearml.files_host + "/"
    assert sorted(k for k in clearml.files if k.startswith("retention/")) == sorted(
        m["uri"][len(prefix):] for m in left)


def test_bit_identical_resume_in_new_processes(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    script = REPO / "examples" / "resume_after_crash.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_BACKEND="clearml", CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "spool"), PYTHONHASHSEED="0")

    def train(name: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), "--steps", "20", "--out", out, *extra], cwd=tmp_path,
                              env={**env, "RUN_NAME": name}, capture_output=True, text=True, timeout=240)

    full = train("full", "full.safetensors")
    assert full.returncode == 0, full.stderr[-3000:]
    cut = train("cut", "x.safetensors", "--stop-after", "13")
    assert cut.returncode == 3, cut.stderr[-3000:]
    resumed = train("cut", "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start was 14" in resumed.stdout
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cut_tasks = [t for t in clearml.tasks.values() if t["name"] == "cut"]
    assert len(cut_tasks) == 1 and cut_tasks[0]["status"] == "completed"  # continued, not duplicated
    assert len(cut_tasks[0]["models"]["input"]) == 1  # the checkpoint it resumed from
