"""The ClearML backend with the real ``clearml`` SDK.

Online, the SDK talks HTTP to a loopback fake of the ClearML API and file server
(``tests/fakes/clearml_server.py``): nothing in the SDK is patched.  Offline, the SDK
writes its real session folder and zip, which the tests open and read back.
"""

from __future__ import annotations

import atexit
import faulthandler
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from fakes.clearml import FakeClearmlServer, OfflineSession, close_current_task, forget_master_process, sdk_env
from helpers import overwrite
from safetensors.torch import load

import ckpt_track as ct
from ckpt_track.backends.clearml import ClearmlBackend, ClearmlCheckpoint, ClearmlRun, _compat
from ckpt_track.backends.clearml.online import Online
from ckpt_track.errors import AuthError, BackendError, BackendUnavailable, CheckpointNotFound, ConfigError, InvalidRef
from ckpt_track.format import MANIFEST, LocalCheckpoint, Manifest, is_blob, read_manifest, verify
from ckpt_track.records import RunSpec
from ckpt_track.refs import restore_commands
from ckpt_track.testing.contract import BackendContract, blob_state, make_blob_checkpoint, make_checkpoint

REPO = Path(__file__).resolve().parents[2]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clearml_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeClearmlServer]:
    """One fake server and one SDK environment for the session: the SDK keeps its config,
    login and host in process-wide state, so every test must see the same ones."""
    server = FakeClearmlServer().start()
    # stopped at interpreter exit, after the SDK's own exit hooks (atexit runs last-registered first):
    # they flush reporters of tasks from earlier tests, and would retry against a stopped server
    atexit.register(server.stop)
    with sdk_env(server, tmp_path_factory.mktemp("clearml-home")):
        yield server
    forget_master_process()


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
        forget_master_process()
        faulthandler.cancel_dump_traceback_later()


class TestClearmlContract(BackendContract):
    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def backend(self, clearml: FakeClearmlServer) -> ClearmlBackend:
        return ClearmlBackend({})

    @pytest.fixture
    def settings_overrides(self, clearml: FakeClearmlServer) -> dict[str, Any]:
        return {"backend": "clearml"}

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, ct.Ref]]:
        return [(text, ref) for text, ref in REFS if text.startswith("http")]


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
    records = sorted(k for k in session.artifacts if not k.startswith("ckpt_track-blob-"))
    assert records == ["ckpt-v000001", "ckpt-v000002", "ckpt-v000003"]
    for version, (step, loss) in enumerate(losses.items(), 1):
        key = f"ckpt-v{version:06d}"
        meta = session.artifact_metadata(key)
        assert (meta["format"], meta["version"], meta["step"], meta["epoch"]) == ("ckpt_track/1", str(version),
                                                                                 str(step), str(step // 10))
        files = session.artifact_files(key)
        manifest = Manifest.from_json(json.loads(files[MANIFEST]))
        assert manifest.step == step and manifest.metrics == {"val/loss": loss}
        assert manifest.lineage["run"] == str(run.ref)
        assert manifest.lineage["parent"] == (None if version == 1 else f"{run.ref}@step={step - 10}")
        assert json.loads(meta["lineage"]) == manifest.lineage
        # the checkpoint's artifact holds the small files; its tensor files are task artifacts of their own
        blobs = json.loads(meta["blobs"])
        assert blobs and set(files) == {*manifest.files, MANIFEST} - set(blobs) and all(map(is_blob, blobs))
        files.update({f: session.artifact_file(f"ckpt_track-blob-{f}") for f in blobs})
        for name, entry in manifest.files.items():  # every file, byte for byte, as the manifest hashed it
            assert len(files[name]) == entry.size and xxhash.xxh3_128(files[name]).hexdigest() == entry.hash
        tensors = {k: v for f in blobs for k, v in load(files[f]).items()}
        assert all(torch.equal(tensors[f"model/{k}"], v) for k, v in expected[step].items())
    props = session.user_properties()
    aliases = json.loads(props["ckpt_track_aliases"])
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


def test_offline_aliases_move_and_deletes_never_reuse_a_version(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="offline-proj", name="aliases"))
    a = be.put(run, make_checkpoint(tmp_path / "spool", 1), ["best", "step-1"])
    b = be.put(run, make_checkpoint(tmp_path / "spool", 2), ["latest", "step-2"])
    # the SDK internal the backend trims on delete (else the next upload re-adds the deleted artifact)
    assert _compat.problems(be.tasks.open[run.run_id].task) == []
    be.set_aliases(b, ["best"])
    assert [s.aliases for s in be.list(run)] == [("step-1",), ("best", "latest", "step-2")]
    be.delete(b)
    c = be.put(run, make_checkpoint(tmp_path / "spool", 3), ["latest"])
    assert [(s.version, s.step, s.aliases) for s in be.list(run)] == [(1, 1, ("step-1",)), (3, 3, ("latest",))]
    be.finish_run(run)
    session = OfflineSession(tmp_path / "clearml-cache" / "offline" / f"{run.run_id}.zip")
    assert sorted(session.artifacts) == ["ckpt-v000001", "ckpt-v000003"]
    assert not any("ckpt-v000002" in n for n in session.names)  # its file is gone too
    with pytest.raises(BackendError, match="read-only"):
        ClearmlBackend({}).delete(c)  # a closed offline session cannot change
    assert a.version == 1


def test_offline_run_id_continues_the_earlier_session(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    """The SDK cannot reopen an offline session: a new one continues it, holding its newest checkpoint
    (and its best); a run killed before closing is tests/backends/test_clearml_resume.py."""
    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="offline-proj", run_id="crashy"))
    be.put(run, make_checkpoint(tmp_path / "spool", 1, {"val/loss": 0.1}), ["best", "step-1"])
    be.put(run, make_checkpoint(tmp_path / "spool", 2, {"val/loss": 0.5}), ["latest", "step-2"])
    be.finish_run(run)
    again = ClearmlBackend({"offline": True})
    cont = again.open_run(RunSpec(project="offline-proj", run_id="crashy"))
    assert cont.resumed and cont.run_id == "crashy" and cont.ref != run.ref
    assert [(s.step, s.aliases) for s in again.list(cont)] == [(1, ("best", "step-1")), (2, ("latest", "step-2"))]
    again.finish_run(cont)
    with pytest.raises(ConfigError, match="resume='never'"):
        ClearmlBackend({"offline": True}).open_run(RunSpec(project="offline-proj", run_id="crashy", resume="never"))
    with pytest.raises(CheckpointNotFound):
        ClearmlBackend({"offline": True}).open_run(RunSpec(project="offline-proj", run_id="never-was", resume="must"))
    # find by <project>/<run id> among the sessions on disk
    assert ClearmlBackend({"offline": True}).find_run(ct.Ref("clearml", "offline-proj/crashy")).run_id == "crashy"


# -- incremental checkpoints: what the SDK actually wrote and sent -------------------------------------
DEDUP_STEPS = ((1, ()), (2, ("w1",)), (3, ("w1",)))  # then one tensor changed, then nothing changed
Y2K = 946_684_800 * 10**9


def _own_bytes(ckpt: LocalCheckpoint) -> int:
    """Bytes of the files a checkpoint's own model or artifact holds (manifest, state)."""
    return sum((ckpt.path / f).stat().st_size for f in [*ckpt.manifest.files, MANIFEST] if not is_blob(f))


def test_offline_session_gets_each_tensor_file_once(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="offline-proj", name="dedup"))
    data = tmp_path / "clearml-cache" / "offline" / run.run_id / "data"
    ckpts, written = [], []
    for step, changed in DEDUP_STEPS:
        old = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
        for path in old:  # any file the SDK writes again gets a new modification time
            os.utime(path, ns=(Y2K, Y2K))  # not 0: zip, which packs the session at the end, starts at 1980
        ckpt = make_blob_checkpoint(tmp_path / "spool", step, blob_state(0, changed))
        stored = be.put(run, ckpt)
        written.append(sorted(p.name for p in data.rglob("*") if p.is_file() and p.stat().st_mtime_ns != Y2K))
        assert stored.uploaded == _own_bytes(ckpt) + sum(ckpt.manifest.files[f].size for f in written[-1]
                                                         if is_blob(f))
        ckpts.append(ckpt)
    first, second, third = (sorted(f for f in c.manifest.files if is_blob(f)) for c in ckpts)
    assert written[0] == sorted([*first, "ckpt-v000001.zip"])
    changed_file = sorted(set(second) - set(first))
    assert len(changed_file) == 1 and written[1] == sorted([*changed_file, "ckpt-v000002.zip"])
    assert third == second and written[2] == ["ckpt-v000003.zip"]  # no tensor bytes at all
    (gone,) = set(first) - set(second)  # the old w1
    be.delete(be.list(run)[0])  # v1: its w1 file goes, the four files v2 and v3 also list stay
    assert sorted(p.name for p in data.rglob("t-*.safetensors")) == third and gone not in third
    be.finish_run(run)

    session = OfflineSession(data.parent.with_suffix(".zip"))
    assert sorted(k.removeprefix("ckpt_track-blob-") for k in session.artifacts if k.startswith("ckpt_track-blob-")) \
        == third
    for key in ("ckpt-v000002", "ckpt-v000003"):  # packages hold no tensors
        assert sorted(session.artifact_files(key)) == [MANIFEST, "state.json"]
        assert json.loads(session.artifact_metadata(key)["blobs"]) == third
    reader = ClearmlBackend({})
    got = reader.get(reader.list(reader.find_run(run.ref))[-1], tmp_path / "dl")
    assert verify(got.path).step == 3
    assert all((got.path / f).read_bytes() == (ckpts[2].path / f).read_bytes() for f in ckpts[2].manifest.files)


def test_online_sends_only_changed_tensor_files(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    be = ClearmlBackend({})
    run = be.open_run(RunSpec(project="dedup", name="dedup-online"))
    sent, ckpts = [], []
    for step, changed in DEDUP_STEPS:
        ckpt = make_blob_checkpoint(tmp_path / "spool", step, blob_state(0, changed))
        start = len(clearml.uploads)
        stored = be.put(run, ckpt)
        sent.append(clearml.uploads[start:])  # what reached the file server during this put
        blobs = [n for k, n in sent[-1] if "/artifacts/ckpt_track-blob-" in k]
        assert stored.uploaded == _own_bytes(ckpt) + sum(blobs)
        ckpts.append(ckpt)
    be.finish_run(run)
    first, second, third = ({f for f in c.manifest.files if is_blob(f)} for c in ckpts)
    for ups, expect in zip(sent, (first, second - first, set())):
        packages = [k for k, _ in ups if k.endswith(".zip")]
        assert sorted(k.rsplit("/", 1)[1] for k, _ in ups if k not in packages) == sorted(expect)
        assert len(packages) == 1  # the model package: the small files only
        with zipfile.ZipFile(io.BytesIO(clearml.files[packages[0]])) as zf:
            assert sorted(zf.namelist()) == [MANIFEST, "state.json"]
    assert len(second - first) == 1 and third == second
    tensor_bytes = [sum(n for k, n in ups if not k.endswith(".zip")) for ups in sent]
    assert tensor_bytes[1] == ckpts[1].manifest.files[(second - first).pop()].size and tensor_bytes[2] == 0
    # every checkpoint comes back whole from what the server holds
    for stored, ckpt in zip(be.list(run), ckpts):
        got = be.get(stored, tmp_path / f"dl-{stored.version}")
        assert read_manifest(got.path) == ckpt.manifest and verify(got.path).step == ckpt.step


# -- online: what the ClearML UI and a plain SDK client see --------------------------------------------
def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def test_online_checkpoints_are_native_clearml_models(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    from clearml import Model, Task

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
    # the model's description (the UI's "Description") and metadata say how to restore it
    assert f"ckpt-track restore clearml://{run.id}@step=20 -o DIR" in models["20"]["comment"]
    assert models["20"]["metadata"]["restore_python"]["value"] == restore_commands(f"clearml://{run.id}@step=20")[1]
    assert {e["model"] for e in task["models"]["output"]} == {m["id"] for m in models.values()}
    scalars = sorted((e["metric"], e["variant"], e["iter"], e["value"]) for e in clearml.scalars(run.id))
    assert scalars == sorted([("val", "loss", 10, 0.7), ("val", "loss", 20, 0.3), ("val", "loss", 30, 0.5),
                              ("acc", "acc", 10, 1 - 0.7), ("acc", "acc", 20, 1 - 0.3), ("acc", "acc", 30, 1 - 0.5)])
    # a plain ClearML user finds the best checkpoint by tag, gets its package (manifest, state) and
    # the tensor files it lists from the task's artifacts
    found = Model.query_models(project_name="native", tags=["best"])
    assert [m.id for m in found] == [models["20"]["id"]]
    folder = tmp_path / "by-hand"
    shutil.copytree(found[0].get_local_copy(raise_on_error=True), folder)
    artifacts = Task.get_task(task_id=found[0].task).artifacts
    for fname in json.loads(found[0].get_metadata("blobs") or "[]"):
        shutil.copyfile(artifacts[f"ckpt_track-blob-{fname}"].get_local_copy(raise_on_error=True), folder / fname)
    assert verify(folder).step == 20
    # the links ckpt_track hands out open the same run and checkpoint again
    stored = ct.list_checkpoints(run.ref, ct.load_settings({"backend": "clearml"}))
    assert ct.parse_ref(stored[1].native.url) == ct.Ref("clearml", f"models/{models['20']['id']}")
    assert ct.parse_ref(run._targets[0][1].native.url) == run.ref


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
    assert [e["model"] for e in task["models"]["input"]] == [src.native.key]
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
    # the files left: the two models' packages and exactly the tensor files they list
    blobs = {a["key"]: a["uri"] for a in clearml.tasks[run.id]["execution"]["artifacts"]}
    assert sorted(blobs) == sorted({f"ckpt_track-blob-{f}" for m in left
                                    for f in json.loads(m["metadata"]["blobs"]["value"])})
    prefix = clearml.files_host + "/"
    assert sorted(k for k in clearml.files if k.startswith("retention/")) == sorted(
        u[len(prefix):] for u in [*(m["uri"] for m in left), *blobs.values()])


def test_bit_identical_resume_in_a_new_process(clearml: FakeClearmlServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Train, stop at step 13, resume in a fresh process through ClearML: the weights end
    bit-identical to an uninterrupted run (which needs no tracker: it runs on ``local``)."""
    import runpy

    from safetensors.torch import load_file

    script = str(REPO / "examples" / "resume_after_crash.py")

    def train_here(backend: str, name: str, out: str, *extra: str) -> int:
        monkeypatch.setenv("CKPT_TRACK_BACKEND", backend)
        monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "spool"))
        monkeypatch.setenv("RUN_NAME", name)
        monkeypatch.setattr(sys, "argv", [script, "--steps", "20", "--out", out, *extra])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(script, run_name="__main__")
        return int(done.value.code or 0)

    assert train_here("local", "full", "full.safetensors") == 0
    assert train_here("clearml", "cut", "x.safetensors", "--stop-after", "13") == 3
    # CLEARML_PROC_MASTER_ID: the SDK marks this process as a task's master; a child seeing it would
    # take itself for a subprocess of that task and get a stub task from Task.init
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_PROC_", "TRAINS_PROC_"))}
    resumed = subprocess.run([sys.executable, script, "--steps", "20", "--out", "resumed.safetensors"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start was 14" in resumed.stdout
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cut_tasks = [t for t in clearml.tasks.values() if t["name"] == "cut"]
    assert len(cut_tasks) == 1 and cut_tasks[0]["status"] == "completed"  # continued, not duplicated
    assert len(cut_tasks[0]["models"]["input"]) == 1  # the checkpoint it resumed from
    steps = sorted(int(m["metadata"]["step"]["value"]) for m in clearml.models.values()
                   if m.get("task") == cut_tasks[0]["id"])
    assert steps == [0, 5, 10, 13, 15]


def test_starting_a_run_leaves_the_training_rng_alone(clearml: FakeClearmlServer) -> None:
    """ClearML's Task.init reseeds random/numpy/torch; through ckpt_track it must not, or the
    same script would train differently on this backend than on any other."""
    import random

    import numpy as np

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    before = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    run = ct.init(project="rng", name="rng", backend="clearml")
    after = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    run.finish()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()


# -- references ----------------------------------------------------------------------------------------
TID = "4a1b2c3d4e5f60718293a4b5c6d7e8f9"
MID = "0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
PID = "7c0f4a9e2b1d4e6f8a3c5b7d9e1f2a4c"
OFF = "offline-1f2e3d4c5b6a79880716253443526170"
REFS = [
    (f"clearml://{TID}", ct.Ref("clearml", TID)),
    (f"clearml://{TID}@step=500", ct.Ref("clearml", TID, step=500)),
    (f"clearml://{TID}@best", ct.Ref("clearml", TID, alias="best")),
    (f"clearml://{TID}:v3", ct.Ref("clearml", TID, version=3)),
    (TID, ct.Ref("clearml", TID)),
    (f"{TID}@latest", ct.Ref("clearml", TID, alias="latest")),
    (f"{TID}:v2", ct.Ref("clearml", TID, version=2)),
    (f"clearml://{OFF}@step=10", ct.Ref("clearml", OFF, step=10)),
    (OFF, ct.Ref("clearml", OFF)),
    (f"{OFF}@best", ct.Ref("clearml", OFF, alias="best")),
    (f"clearml://models/{MID}", ct.Ref("clearml", f"models/{MID}")),
    ("clearml://resnet/run-a@best", ct.Ref("clearml", "resnet/run-a", alias="best")),
    ("clearml://team/vision/run-a@step=20", ct.Ref("clearml", "team/vision/run-a", step=20)),
    (f"https://app.clear.ml/projects/*/experiments/{TID}/output/execution", ct.Ref("clearml", TID)),
    (f"https://app.clear.ml/projects/{PID}/experiments/{TID}", ct.Ref("clearml", TID)),
    (f"https://app.clear.ml/projects/{PID}/tasks/{TID}/output/log", ct.Ref("clearml", TID)),
    (f"http://localhost:8080/projects/{PID}/tasks/{TID}/info-output/metrics/scalar?columns=name", ct.Ref("clearml", TID)),
    (f"https://clearml.example.com/projects/*/models/{MID}/general", ct.Ref("clearml", f"models/{MID}")),
    (f"https://app.clear.ml/projects/{PID}/models/{MID}/metadata#top", ct.Ref("clearml", f"models/{MID}")),
]


@pytest.mark.parametrize("text,expected", REFS, ids=[r[0][:60] for r in REFS])
def test_reference_forms_parse_and_round_trip(text: str, expected: ct.Ref) -> None:
    ref = ct.parse_ref(text)
    assert ref == expected
    assert ct.parse_ref(str(ref)) == ref


MALFORMED_REFS = [  # run through the contract (malformed_refs)
    f"https://app.clear.ml/projects/*/experiments/{TID[:-1]}",  # 31 hex digits
    "https://app.clear.ml/projects/*/experiments/not-a-task-id/output/log",
    f"https://app.clear.ml/projects/*/datasets/{TID}",
    "offline-xyz",
    f"{TID}@step=-1",
    f"clearml://{TID}@step=x",
    f"clearml://{TID}:v0",
    f"clearml://{TID} extra",
]


def test_run_path_that_is_no_clearml_run_is_invalid(clearml: FakeClearmlServer) -> None:
    with pytest.raises(InvalidRef, match="accepted forms"):
        ClearmlBackend({}).find_run(ct.Ref("clearml", "just-a-name"))
    with pytest.raises(InvalidRef):
        ClearmlBackend({}).resolve_ref(ct.Ref("clearml", "models/not-hex"))


@pytest.fixture(scope="module")
def logged(clearml_server: FakeClearmlServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One online run with three checkpoints (steps 10, 20, 30; best at 20), run id ``refs-fixed``."""
    spool = tmp_path_factory.mktemp("clearml-spool")
    be = ClearmlBackend({})
    run = be.open_run(RunSpec(project="refs", name="ref-run", run_id="refs-fixed"))
    weights = {}
    for version, (step, loss) in enumerate(((10, 0.5), (20, 0.2), (30, 0.4)), 1):
        ckpt = make_checkpoint(spool, step, {"val/loss": loss})
        weights[step] = verify(ckpt.path)
        aliases = ["latest", f"step-{step}"] + (["best"] if step != 30 else [])
        stored = be.put(run, ckpt, aliases)
        assert stored.version == version
    be.finish_run(run)
    forget_master_process()
    listed = be.list(run)
    assert isinstance(run.native, ClearmlRun) and isinstance(listed[1].native, ClearmlCheckpoint)
    return {"tid": run.native.task_id, "pid": clearml_server.tasks[run.native.task_id]["project"],
            "mid2": listed[1].native.key, "url2": listed[1].native.url, "run_url": run.native.url,
            "manifests": weights}


RESTORE_FORMS = [
    ("clearml://{tid}", 30), ("clearml://{tid}@step=20", 20), ("clearml://{tid}@best", 20),
    ("clearml://{tid}:v1", 1 * 10), ("clearml://{tid}@step-30", 30), ("{tid}", 30), ("{tid}@step=10", 10),
    ("clearml://models/{mid2}", 20), ("{url2}", 20), ("{run_url}", 30),
    ("http://localhost:8080/projects/{pid}/experiments/{tid}/output/execution", 30),
    ("https://app.clear.ml/projects/*/tasks/{tid}/output/log", 30),
    ("http://localhost:8080/projects/{pid}/models/{mid2}/general", 20),
    ("clearml://refs/ref-run@step=20", 20), ("clearml://refs/refs-fixed@latest", 30),
]


@pytest.mark.parametrize("form,step", RESTORE_FORMS, ids=[f[0] for f in RESTORE_FORMS])
def test_every_reference_form_restores_through_the_server(clearml: FakeClearmlServer, logged: dict[str, Any],
                                                          form: str, step: int) -> None:
    text = form.format(**logged)
    settings = ct.load_settings({"backend": "clearml"})
    model = torch.nn.Linear(8, 4)
    restored = ct.restore(text, model=model, settings=settings)
    assert restored.step == step
    assert restored.ref.startswith(f"clearml://{logged['tid']}:v")  # canonical: the task and version


# -- errors ---------------------------------------------------------------------------------------------
def test_server_down_is_backend_unavailable_naming_the_host(clearml: FakeClearmlServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}.*CLEARML_API_HOST"):
        ClearmlBackend({}).open_run(RunSpec(project="down", name="x"))
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        ct.restore(f"clearml://{TID}", model=torch.nn.Linear(4, 2), settings=ct.load_settings({"backend": "clearml"}))


def test_server_lost_mid_run_defers_the_upload_and_loses_nothing(clearml: FakeClearmlServer) -> None:
    settings = {"backend": "clearml"}
    run = ct.init(project="outage", name="outage", settings=settings)
    run.log_checkpoint(1, model=_small_model(1), metrics={"val/loss": 0.5}, blocking=True)
    port = clearml.port
    clearml.stop()
    try:
        deferred = run.log_checkpoint(2, model=_small_model(2), metrics={"val/loss": 0.4}, blocking=True)
        assert deferred.wait() is None  # kept on disk, training goes on
    finally:
        clearml.start(port)
    run.finish()  # the server is back: the deferred checkpoint is uploaded first
    listed = ct.list_checkpoints(run.ref, ct.load_settings(settings))
    assert [(s.version, s.step) for s in listed] == [(1, 1), (2, 2)] and "best" in listed[1].aliases


def test_wrong_credentials_are_an_auth_error(clearml: FakeClearmlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "not-the-secret")
    with pytest.raises(AuthError, match="CLEARML_API_ACCESS_KEY.*CLEARML_API_SECRET_KEY"):
        ClearmlBackend({}).find_run(ct.Ref("clearml", TID))


def test_missing_credentials_are_an_auth_error(clearml: FakeClearmlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEARML_API_ACCESS_KEY")
    monkeypatch.delenv("CLEARML_API_SECRET_KEY")
    with pytest.raises(AuthError, match="CLEARML_API_ACCESS_KEY"):
        ClearmlBackend({}).open_run(RunSpec(project="nocreds", name="x"))


def test_not_found(clearml: FakeClearmlServer, logged: dict[str, Any]) -> None:
    settings = ct.load_settings({"backend": "clearml"})
    with pytest.raises(CheckpointNotFound, match="available steps: 10, 20, 30"):
        ct.restore(f"clearml://{logged['tid']}@step=99", model=torch.nn.Linear(8, 4), settings=settings)
    with pytest.raises(CheckpointNotFound, match="no such model"):
        ct.restore(f"clearml://models/{MID}", model=torch.nn.Linear(8, 4), settings=settings)
    with pytest.raises(CheckpointNotFound, match="offline"):
        ct.restore(OFF, model=torch.nn.Linear(8, 4), settings=settings)


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="output_url"):
        ClearmlBackend({"output_url": "s3://x"})
    with pytest.raises(ConfigError, match="offline"):
        ClearmlBackend({"offline": "maybe"})


# -- the SDK internals the backend relies on ----------------------------------------------------------------
def test_sdk_internals_the_backend_relies_on_are_still_there() -> None:
    """``ckpt_track/backends/clearml/_compat.py`` uses private parts of the SDK where it has no public
    API; an SDK update that moves or renames one must fail here, not silently in a user's run."""
    from clearml import Task
    from clearml.backend_api import Session

    assert _compat.problems() == []
    before = _compat.default_seed()
    Task.set_random_seed(99)
    try:
        assert _compat.default_seed() == 99
    finally:
        Task.set_random_seed(before)
    assert _compat.default_seed() == before
    session = Session.__new__(Session)  # not connected: only the timeouts are set
    _compat.set_request_timeout(session, 7.0)
    assert session._session_initial_timeout == session._session_timeout == (7.0, 7.0)


# -- the fake and the SDK agree ---------------------------------------------------------------------------
def test_every_faked_endpoint_exists_in_the_installed_sdk() -> None:
    """The fake answers only endpoints the installed SDK has request classes for, so an SDK
    that renames or drops one breaks this test rather than users."""
    import importlib
    import pkgutil

    from clearml.backend_api import services

    newest = max((m.name for m in pkgutil.iter_modules(services.__path__) if m.name.startswith("v")),
                 key=lambda v: tuple(map(int, v[1:].split("_"))))
    endpoints = [n[1:].replace("__", ".") for n in dir(FakeClearmlServer) if n.count("__") == 1 and n.startswith("_")
                 and not n.startswith("__")] + ["events.add_batch"]
    for endpoint in endpoints:
        service, action = endpoint.split(".")
        module = importlib.import_module(f"{services.__name__}.{newest}.{service}")
        cls = "".join(p.title() for p in action.split("_")) + "Request"
        assert hasattr(module, cls), f"{endpoint}: no {cls} in clearml {newest}.{service}"


def test_module_imports_and_parses_without_the_sdk() -> None:
    code = (
        "import sys; sys.modules['clearml'] = None\n"
        "import ckpt_track\n"
        "from ckpt_track.backends.clearml import ClearmlBackend\n"
        f"print(ClearmlBackend.parse_ref('{TID}@best'))\n"
        "from ckpt_track.backends import registry\n"
        "from ckpt_track.errors import BackendNotInstalled\n"
        "try:\n    registry.get_class('clearml')\nexcept BackendNotInstalled as e:\n    print('missing:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert f"clearml://{TID}@best" in out.stdout and "pip install 'ckpt-track[clearml]'" in out.stdout


LIVE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_PROC_", "TRAINS_PROC_"))}  # at import


@pytest.mark.live
def test_live_round_trip_against_the_configured_server(tmp_path: Path) -> None:
    """Against a real ClearML server (app.clear.ml or self-hosted), with the credentials the test
    run started with; in a subprocess, since this process's SDK is bound to the fake server."""
    if not (LIVE_ENV.get("CLEARML_API_ACCESS_KEY") and LIVE_ENV.get("CLEARML_API_SECRET_KEY")):
        pytest.skip("set CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY (and CLEARML_API_HOST) to run")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from ckpt_track.records import RunSpec\n"
        "from ckpt_track.backends.clearml import ClearmlBackend\n"
        "from ckpt_track.format import verify\n"
        "from ckpt_track.testing.contract import make_checkpoint\n"
        "tmp = Path(sys.argv[1]); be = ClearmlBackend({})\n"
        "run = be.open_run(RunSpec(project='ckpt_track-live', name=f'live-{os.getpid()}'))\n"
        "stored = be.put(run, make_checkpoint(tmp / 'spool', 1, {'val/loss': 1.0}), ['latest', 'step-1'])\n"
        "assert verify(be.get(stored, tmp / 'dl').path).step == 1\n"
        "be.delete(stored); be.finish_run(run); print('live ok', run.ref)\n"
    )
    env = {**LIVE_ENV, "HOME": str(tmp_path), "CLEARML_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0 and "live ok" in out.stdout, out.stderr[-3000:]


def test_imported_offline_session_stays_restorable_online(clearml: FakeClearmlServer, tmp_path: Path) -> None:
    """``clearml-task --import-offline-session`` (here its API, Task.import_offline_session) uploads the
    artifacts and the user properties; the imported task is then an ordinary online run."""
    from clearml import Task

    be = ClearmlBackend({"offline": True})
    run = be.open_run(RunSpec(project="imported", name="was-offline"))
    be.put(run, make_checkpoint(tmp_path / "spool", 5, {"val/loss": 1.0}), ["latest", "step-5", "best"])
    be.put(run, make_checkpoint(tmp_path / "spool", 6, {"val/loss": 2.0}), ["latest", "step-6"])
    incremental = make_blob_checkpoint(tmp_path / "spool", 7, blob_state(0))  # tensors as task artifacts
    be.put(run, incremental)
    be.finish_run(run)
    new_id = Task.import_offline_session(str(tmp_path / "clearml-cache" / "offline" / f"{run.run_id}.zip"))
    settings = ct.load_settings({"backend": "clearml"})
    listed = ct.list_checkpoints(f"clearml://{new_id}", settings)
    assert [(s.version, s.step, s.aliases) for s in listed] == [
        (1, 5, ("best", "step-5")), (2, 6, ("latest", "step-6")), (3, 7, ())]
    assert verify(ClearmlBackend({}).get(listed[2], tmp_path / "dl-7").path) == incremental.manifest
    listed = listed[:2]
    assert ct.restore(f"clearml://{new_id}@best", model=torch.nn.Linear(8, 4), settings=settings).step == 5
    online = ClearmlBackend({})
    online.set_aliases(listed[1], ["best"])  # a finished task: edited like the UI edits user properties
    assert [s.aliases for s in online.list(online.find_run(ct.Ref("clearml", new_id)))] == [
        ("step-5",), ("best", "latest", "step-6"), ()]


def test_get_reuses_a_verified_copy_and_replaces_a_damaged_one(clearml: FakeClearmlServer, logged: dict[str, Any],
                                                               tmp_path: Path) -> None:
    be = ClearmlBackend({})
    stored = be.list(be.find_run(ct.Ref("clearml", logged["tid"])))[0]
    first = be.get(stored, tmp_path / "v1")
    clearml.calls.clear()
    assert be.get(stored, tmp_path / "v1").path == first.path and clearml.calls == []  # no download
    shard = next(first.path.glob("*.safetensors"))
    overwrite(shard, b"garbage")
    assert verify(be.get(stored, tmp_path / "v1").path).step == 10  # fetched again


def test_get_links_tensor_files_an_earlier_download_holds(clearml: FakeClearmlServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    be = ClearmlBackend({})
    run = be.open_run(RunSpec(project="dedup", name="dedup-cache"))
    ckpts = [make_blob_checkpoint(tmp_path / "spool", step, blob_state(0, changed)) for step, changed in DEDUP_STEPS[:2]]
    stored = [be.put(run, c) for c in ckpts]
    be.finish_run(run)
    fetched: list[str] = []
    real = Online.fetch_blobs

    def counting(self, st, names, into):  # type: ignore[no-untyped-def]
        fetched.extend(names)
        return real(self, st, names, into)

    monkeypatch.setattr(Online, "fetch_blobs", counting)
    cache = tmp_path / "cache"  # the core's layout: one folder per version of the run
    be.get(stored[0], cache / "v1")
    assert len(fetched) == 5
    fetched.clear()
    got = be.get(stored[1], cache / "v2")
    assert len(fetched) == 1  # only the changed tensor file; the rest is linked from v1
    assert read_manifest(got.path) == ckpts[1].manifest and verify(got.path).step == ckpts[1].step
