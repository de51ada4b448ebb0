"""The MLflow backend against a real ``mlflow server`` (and, second tier, a sqlite store)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import mlp
from mlflow import MlflowClient

import ckpt_track as ct
from ckpt_track.backends.mlflow import BLOBS, MlflowBackend, MlflowModel, MlflowRun
from ckpt_track.backends.mlflow.native import LISTING
from ckpt_track.errors import BackendUnavailable, CheckpointNotFound
from ckpt_track.format import MANIFEST, LocalCheckpoint, is_blob, verify
from ckpt_track.records import RunSpec
from ckpt_track.refs import Ref, parse_ref
from ckpt_track.testing.contract import BackendContract, blob_state, make_blob_checkpoint

RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
MODEL = "m-5b2b35d077d54185a356ad3e508d698d"


class TestMlflowServerContract(BackendContract):
    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def backend(self, mlflow_env) -> MlflowBackend:
        return MlflowBackend({"tracking_uri": mlflow_env.uri})

    @pytest.fixture
    def settings_overrides(self, mlflow_env) -> dict:
        return {"backend": "mlflow", "mlflow": {"tracking_uri": mlflow_env.uri}}

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        return [(text, ref) for text, ref in REFS if "://" not in text or text.startswith("http")]


class TestMlflowSqliteContract(BackendContract):
    """Second tier: no server, a sqlite store and a local artifact root in tmp_path."""

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def backend(self, tmp_path: Path) -> MlflowBackend:
        return MlflowBackend({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                              "artifact_location": str(tmp_path / "mlruns")})

    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict:
        return {"backend": "mlflow", "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                "artifact_location": str(tmp_path / "mlruns")}}

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        return [(text, ref) for text, ref in REFS if "://" not in text or text.startswith("http")]


# -- references ------------------------------------------------------------------------------
REFS = [
    (f"mlflow://{RUN}@step=3000", Ref("mlflow", RUN, step=3000)),
    (f"mlflow://{RUN}@best", Ref("mlflow", RUN, alias="best")),
    (f"mlflow://{RUN}@latest", Ref("mlflow", RUN, alias="latest")),
    (f"mlflow://{RUN}:v4", Ref("mlflow", RUN, version=4)),
    (f"runs:/{RUN}", Ref("mlflow", RUN)),
    (f"runs:/{RUN}/best", Ref("mlflow", RUN, alias="best")),
    (f"runs:/{RUN}/v2", Ref("mlflow", RUN, version=2)),
    (f"models:/{MODEL}", Ref("mlflow", f"models/{MODEL}")),
    ("models:/resnet-ckpt/3", Ref("mlflow", "registered/resnet-ckpt", version=3)),
    ("models:/resnet-ckpt/latest", Ref("mlflow", "registered/resnet-ckpt", alias="latest")),
    ("models:/resnet-ckpt@best", Ref("mlflow", "registered/resnet-ckpt", alias="best")),
    (f"http://127.0.0.1:5000/#/experiments/1/runs/{RUN}",
     Ref("mlflow", RUN, params=(("ui", "http://127.0.0.1:5000"),))),
    (f"https://mlflow.example.com/tracking/#/experiments/12/runs/{RUN}/artifacts?o=1",
     Ref("mlflow", RUN, params=(("ui", "https://mlflow.example.com/tracking"),))),
    (f"http://localhost:5000/#/experiments/1/models/{MODEL}",
     Ref("mlflow", f"models/{MODEL}", params=(("ui", "http://localhost:5000"),))),
    (f"http://localhost:5000/#/experiments/1/models/{MODEL}/artifacts",
     Ref("mlflow", f"models/{MODEL}", params=(("ui", "http://localhost:5000"),))),
    ("http://localhost:5000/#/models/resnet-ckpt/versions/7",
     Ref("mlflow", "registered/resnet-ckpt", version=7, params=(("ui", "http://localhost:5000"),))),
]


@pytest.mark.parametrize("text,expected", REFS)
def test_reference_forms_parse_and_round_trip(text: str, expected: Ref) -> None:
    ref = parse_ref(text)
    assert ref == expected
    assert parse_ref(str(ref)) == ref


MALFORMED_REFS = [  # run through the contract (malformed_refs)
    "runs:/not-a-run-id",
    "models:/",
    f"http://localhost:5000/#/experiments/1/runs/{RUN[:-1]}",
    "http://localhost:5000/#/experiments/1",
    "models:/bad name/3",
    f"mlflow://{RUN}@step=x",
]


# -- end to end through the server -------------------------------------------------------------
def _model(seed: int = 0) -> torch.nn.Module:
    return mlp((6, 4, 2), seed)


def _settings(server) -> dict:
    return {"backend": "mlflow", "mlflow": {"tracking_uri": server.uri}}


def test_every_reference_form_restores_the_same_checkpoint(mlflow_env) -> None:
    model = _model()
    settings = {"backend": "mlflow", "mlflow": {"tracking_uri": mlflow_env.uri, "register_as": "refs-ckpt"}}
    with ct.init(project="refs", name="r", settings=settings) as run:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
            with torch.no_grad():
                model[0].weight.fill_(float(step))
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
    client = MlflowClient(mlflow_env.uri)
    stored = {s.step: s for s in ct.list_checkpoints(run.ref, ct.load_settings(settings))}
    best = stored[20]
    exp = client.get_run(run.id).info.experiment_id
    mid = best.native.model_id
    v = best.native.registered_version
    forms = [  # (reference, step it must restore)
        (f"mlflow://{run.id}@best", 20), (f"mlflow://{run.id}@step=20", 20), (f"mlflow://{run.id}:v2", 20),
        (f"runs:/{run.id}/best", 20), (f"models:/{mid}", 20), (f"models:/refs-ckpt/{v}", 20),
        ("models:/refs-ckpt@best", 20), ("models:/refs-ckpt/latest", 30),
        (f"{mlflow_env.uri}/#/experiments/{exp}/runs/{run.id}", 30),  # a run page: its latest checkpoint
        (f"{mlflow_env.uri}/#/experiments/{exp}/models/{mid}", 20),
        (f"{mlflow_env.uri}/#/models/refs-ckpt/versions/{v}", 20),
    ]
    s = ct.load_settings(settings)
    for text, step in forms:
        fresh = _model(seed=1)
        assert ct.restore(text, model=fresh, settings=s).step == step, text
        assert torch.equal(fresh[0].weight, torch.full((4, 6), float(step))), text


def test_ui_url_supplies_the_tracking_uri_when_none_is_configured(mlflow_env) -> None:
    with ct.init(project="ui-uri", settings=_settings(mlflow_env)) as run:
        run.log_checkpoint(5, model=_model())
    url = f"{mlflow_env.uri}/#/experiments/1/runs/{run.id}"
    assert ct.restore(url, model=_model()).step == 5  # no tracking URI in the settings


def test_plain_mlflow_client_sees_logged_models(tmp_path: Path, mlflow_env) -> None:
    """A training script configured only by environment; read back with MLflow's own client."""
    script = Path(__file__).parents[2] / "examples" / "resume_after_crash.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_BACKEND="mlflow", CKPT_TRACK_MLFLOW__TRACKING_URI=mlflow_env.uri, RUN_NAME="plain",
               CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "spool"))
    done = subprocess.run([sys.executable, str(script), "--steps", "12", "--every", "5", "--out", "w.safetensors"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(mlflow_env.uri)
    exp = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'plain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["steps"] == "12" and run.data.params["every"] == "5"
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id='{run.info.run_id}'")
    by_step = {int(m.tags["step"]): m for m in models}
    assert sorted(by_step) == [0, 5, 10]
    for step, m in by_step.items():
        assert m.model_type == "checkpoint" and str(m.status).endswith("READY")
        assert m.tags["ckpt_track.version"] in {"1", "2", "3"}
        assert {x.key for x in m.metrics} == {"train/loss"} and all(x.step == step for x in m.metrics)
        assert f"ckpt_track.alias.step-{step}" in m.tags
    assert "ckpt_track.alias.latest" in by_step[10].tags
    outputs = {o.model_id: o.step for o in client.get_run(run.info.run_id).outputs.model_outputs}
    assert outputs == {m.model_id: s for s, m in by_step.items()}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(h.step for h in history) == [0, 5, 10]


def test_bit_identical_resume_through_the_server(tmp_path: Path, mlflow_env) -> None:
    from safetensors.torch import load_file

    script = Path(__file__).parents[2] / "examples" / "resume_after_crash.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_BACKEND="mlflow", CKPT_TRACK_MLFLOW__TRACKING_URI=mlflow_env.uri,
               CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "spool"))

    def train(name: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), "--steps", "30", "--out", out, *extra], cwd=tmp_path,
                              env={**env, "RUN_NAME": name}, capture_output=True, text=True, timeout=300,
                              check=False)

    assert train("full", "full.safetensors").returncode == 0
    assert train("cut", "x.safetensors", "--stop-after", "13").returncode == 3
    resumed = train("cut", "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr
    assert "start was 14" in resumed.stdout
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # lineage: the resumed run logged its source model as an input
    client = MlflowClient(mlflow_env.uri)
    exp = client.get_experiment_by_name("resume-test")
    found = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'cut'")[0]
    run = client.get_run(found.info.run_id)  # search results leave model inputs out
    assert run.inputs.model_inputs and run.data.tags["ckpt_track.resumed_from"].endswith(":v4")


def test_resume_from_another_run_records_lineage(mlflow_env) -> None:
    settings = _settings(mlflow_env)
    with ct.init(project="lineage", name="parent", settings=settings) as parent:
        parent.log_checkpoint(3, model=_model(), metrics={"val/loss": 0.3})
    with ct.init(project="lineage", name="child", settings=settings) as child:
        assert child.resume(model=_model(), ref=f"{parent.ref}@best") == 4
        child.log_checkpoint(4, model=_model())
    client = MlflowClient(mlflow_env.uri)
    src = ct.list_checkpoints(parent.ref, ct.load_settings(settings))[0]
    inputs = client.get_run(child.id).inputs.model_inputs
    assert [i.model_id for i in inputs] == [src.native.model_id]
    mine = ct.list_checkpoints(child.ref, ct.load_settings(settings))[0]
    assert mine.lineage["resumed_from"] == str(src.ref) and mine.lineage["parent"] == str(src.ref)


def test_retention_deletes_models_and_artifacts(mlflow_env) -> None:
    settings = {**_settings(mlflow_env), "retention": {"keep_last": 1, "keep_best": 1}}
    with ct.init(project="retention", settings=settings) as run:
        for step, loss in enumerate([0.5, 0.1, 0.4, 0.3]):
            run.log_checkpoint(step, model=_model(), metrics={"val/loss": loss})
    kept = ct.list_checkpoints(run.ref, ct.load_settings(settings))
    assert [s.step for s in kept] == [1, 3]
    client = MlflowClient(mlflow_env.uri)
    exp = client.get_run(run.id).info.experiment_id
    assert len(client.search_logged_models([exp], filter_string=f"source_run_id='{run.id}'")) == 2
    art = mlflow_env.root / "artifacts" / exp
    non_empty = [d for d in (art / "models").iterdir() if (d / "artifacts" / MANIFEST).is_file()]
    assert len(non_empty) == 2
    # the run keeps exactly the tensor files the two remaining checkpoints name
    needed = {f for s in kept for f in verify(_download(s, mlflow_env)).files if is_blob(f)}
    assert needed and {p.name for p in (art / run.id / "artifacts" / BLOBS).iterdir()} == needed


def _download(stored, server) -> Path:
    dest = server.root / "downloads" / uuid.uuid4().hex
    return MlflowBackend({"tracking_uri": server.uri}).get(stored, dest).path


# -- incremental checkpoints -------------------------------------------------------------------
def _files(ckpt: LocalCheckpoint) -> dict[str, bytes]:
    return {f: (ckpt.path / f).read_bytes() for f in [*ckpt.manifest.files, MANIFEST]}


def test_each_tensor_file_is_stored_once_per_run_on_the_server(tmp_path: Path, mlflow_env) -> None:
    """Read back from the server's artifacts destination: a checkpoint with one changed tensor adds
    only that tensor's file, an unchanged one adds none; deleting keeps what others still name."""
    backend = MlflowBackend({"tracking_uri": mlflow_env.uri})
    run = backend.open_run(RunSpec(project=f"dedup-{uuid.uuid4().hex[:6]}", name="d"))
    art = mlflow_env.root / "artifacts" / run.native.experiment_id
    blobs = art / run.run_id / "artifacts" / BLOBS

    def on_disk() -> dict[str, tuple[int, int]]:  # blob file -> (size, mtime): rewritten files show
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in blobs.iterdir()}

    def model_files(stored) -> set[str]:
        return {p.name for p in (art / "models" / stored.native.model_id / "artifacts").iterdir()}

    srcs = [make_blob_checkpoint(tmp_path, 1, blob_state(0)),
            make_blob_checkpoint(tmp_path, 2, blob_state(0, changed=("w1",))),
            make_blob_checkpoint(tmp_path, 3, blob_state(0, changed=("w1",)))]
    names = [{f for f in c.manifest.files if is_blob(f)} for c in srcs]
    a = backend.put(run, srcs[0])
    first = on_disk()
    assert set(first) == names[0] and len(first) == 5  # four 128 KiB tensors, the small one packed alone
    assert model_files(a) == {MANIFEST, "state.json", LISTING}  # the model holds no tensor bytes
    b = backend.put(run, srcs[1])
    second = on_disk()
    added = set(second) - set(first)
    assert len(added) == 1 and added == names[1] - names[0]  # w1's new file only
    assert {f: second[f] for f in first} == first  # nothing else rewritten
    assert b.uploaded == srcs[1].manifest.files[added.pop()].size + srcs[1].manifest.files["state.json"].size + (
        srcs[1].path / MANIFEST).stat().st_size
    c = backend.put(run, srcs[2])
    assert on_disk() == second and names[2] == names[1]  # an unchanged checkpoint sends no tensor bytes
    assert c.uploaded == srcs[2].manifest.files["state.json"].size + (srcs[2].path / MANIFEST).stat().st_size
    assert model_files(b) == model_files(c) == {MANIFEST, "state.json", LISTING}
    on_server = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
    assert on_server < 1.3 * srcs[0].manifest.size  # three checkpoints in the bytes of about one

    backend.delete(a)  # a's old w1 goes; the files b and c share stay
    assert set(on_disk()) == names[1]
    got = backend.get(c, tmp_path / "dl-c")
    assert _files(got) == _files(srcs[2])
    backend.delete(b)
    assert set(on_disk()) == names[2]
    backend.delete(c)
    assert not blobs.exists() or not any(blobs.iterdir())


def test_checkpoints_logged_with_every_file_in_the_model_still_restore(tmp_path: Path) -> None:
    """Earlier versions put the tensor files into the LoggedModel itself: such checkpoints still
    list, download byte for byte, and keep their files when others are deleted."""
    backend = MlflowBackend({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                             "artifact_location": str(tmp_path / "mlruns")})
    run = backend.open_run(RunSpec(project="old-layout"))
    blobs = Path(run.native.artifact_uri) / BLOBS
    old_src = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(5))
    old = backend.put(run, old_src)
    for p in blobs.iterdir():  # what an earlier version stored: every file in the model's artifacts
        shutil.move(p, Path(old.native.artifact_location) / p.name)
    new_src = make_blob_checkpoint(tmp_path / "spool", 2, blob_state(5, changed=("w2",)))
    new = backend.put(run, new_src)
    assert new.uploaded is not None and new.uploaded > 4 * 128 * 1024  # the run held none of them yet
    assert [s.version for s in backend.list(run)] == [old.version, new.version]
    assert _files(backend.get(old, tmp_path / "dl-old")) == _files(old_src)
    backend.delete(new)
    assert _files(backend.get(backend.list(run)[0], tmp_path / "dl-old-again")) == _files(old_src)


def test_not_found_errors(mlflow_env) -> None:
    s = ct.load_settings(_settings(mlflow_env))
    with pytest.raises(CheckpointNotFound, match="tracking URI"):
        ct.restore(f"mlflow://{RUN}", model=_model(), settings=s)
    with pytest.raises(CheckpointNotFound):
        ct.restore(f"models:/{MODEL}", model=_model(), settings=s)
    with ct.init(project="nf", settings=_settings(mlflow_env)) as run:
        run.log_checkpoint(1, model=_model())
    with pytest.raises(CheckpointNotFound, match="available steps: 1"):
        ct.restore(f"{run.ref}@step=2", model=_model(), settings=s)


def test_server_down_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"
    run = ct.init(project="down", backend="mlflow", settings={"mlflow": {"tracking_uri": uri}})
    assert run.id.startswith("deferred-")  # training starts anyway; the run is opened when MLflow is back
    assert run.log_checkpoint(1, model=_model()).wait() is None  # kept on disk
    with pytest.raises(ct.CheckpointWriteError, match="unreachable"):
        run.finish()
    with pytest.raises(BackendUnavailable, match="server is running"):
        ct.restore(f"mlflow://{RUN}", settings=ct.load_settings({"mlflow": {"tracking_uri": uri}}))


def test_killing_the_server_mid_run_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server killed between checkpoints: the loop goes on; when it returns, everything lands."""
    from mlflow_server import MlflowServer, free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path / "server", free_port()).start()
    try:
        settings = _settings(server)
        run = ct.init(project="killed", name="k", settings=settings)
        run.log_checkpoint(1, model=_model(1), metrics={"val/loss": 0.9}).wait()
        server.stop()
        for step in (2, 3):  # the training loop does not notice
            assert run.log_checkpoint(step, model=_model(step), metrics={"val/loss": 1.0 / step}).wait() is None
        server.start()
        run.log_checkpoint(4, model=_model(4), metrics={"val/loss": 0.1})
        run.finish()
        listed = ct.list_checkpoints(run.ref, ct.load_settings(settings))
        assert [s.step for s in listed] == [1, 2, 3, 4]  # in order, nothing lost
        for s in listed:
            fresh = _model(0)
            ct.restore(s.ref, model=fresh, settings=ct.load_settings(settings))
            assert torch.equal(fresh[0].weight, _model(s.step)[0].weight)  # nothing damaged
    finally:
        server.stop()


def test_several_backends_at_once_and_one_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_env) -> None:
    """backend = ["local", "mlflow"]: each checkpoint lands in both; restore works from either;
    MLflow down does not stop local (reported, retried when it is back)."""
    from mlflow_server import free_port

    settings = {"backend": ["local", "mlflow"], "mlflow": {"tracking_uri": mlflow_env.uri}}
    with ct.init(project="multi", name="both", settings=settings) as run:
        assert [b.name for b, _ in run._targets] == ["local", "mlflow"]
        for step in (1, 2):
            run.log_checkpoint(step, model=_model(step), metrics={"val/loss": 1.0 / step})
    local_run, mlflow_run = (info for _, info in run._targets)
    s = ct.load_settings(settings)
    for ref in (local_run.ref, mlflow_run.ref):
        fresh = _model(0)
        assert ct.restore(f"{ref}@step=1", model=fresh, settings=s).step == 1
        assert torch.equal(fresh[0].weight, _model(1)[0].weight)
        assert [c.step for c in ct.list_checkpoints(ref, s)] == [1, 2]

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = {"backend": ["local", "mlflow"], "mlflow": {"tracking_uri": mlflow_env.uri}}
    run2 = ct.init(project="multi", name="half", settings=dead)
    run2._targets[1][0].sdk.tracking_uri = f"http://127.0.0.1:{free_port()}"  # the server "goes away"
    run2._targets[1][0].sdk._client_obj = None
    run2.log_checkpoint(5, model=_model(5)).wait()  # does not raise: local got it, MLflow is owed it
    assert [c.step for c in ct.list_checkpoints(run2._targets[0][1].ref, s)] == [5]
    with pytest.raises(ct.CheckpointWriteError, match="mlflow"):
        run2.finish()


def test_comet_sdk_patches_do_not_copy_checkpoints_elsewhere(tmp_path: Path, mlflow_env) -> None:
    """comet_ml (imported by transformers when installed) patches MlflowClient.log_model_artifacts;
    our uploads must not go through the patched method."""
    code = (
        "import comet_ml, torch, ckpt_track as ct\n"
        f"s = {{'backend': 'mlflow', 'mlflow': {{'tracking_uri': {mlflow_env.uri!r}}}}}\n"
        "with ct.init(project='comet-patch', settings=s) as run:\n"
        "    run.log_checkpoint(1, model=torch.nn.Linear(2, 2))\n"
        "print(len(ct.list_checkpoints(run.ref, ct.load_settings(s))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_TRACK_", "COMET_"))}
    env.update(COMET_OFFLINE_DIRECTORY=str(tmp_path / "comet-offline"), CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "s"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"
    leftovers = [p for p in tmp_path.rglob("*") if "comet" in p.name.lower() and p.is_dir()]
    assert not (tmp_path / ".cometml-runs").exists() and not leftovers


def test_restore_links_tensor_files_an_earlier_download_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restoring v2 after v1 downloads only the tensor file that changed; the others come
    from the local cache of v1 (same name, size and hash in both manifests)."""
    settings = {"backend": "mlflow", "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                "artifact_location": str(tmp_path / "mlruns")}}
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])  # four 1 MiB weights
    with ct.init(project="cache-reuse", name="r", monitor=None, settings=settings) as run:
        run.log_checkpoint(1, model=model)
        with torch.no_grad():
            model[3].weight.add_(1.0)
        run.log_checkpoint(2, model=model)
    downloaded: list[str] = []
    real = MlflowBackend._download_blobs

    def counting(self, stored, names, dest):  # type: ignore[no-untyped-def]
        downloaded.extend(names)
        return real(self, stored, names, dest)

    monkeypatch.setattr(MlflowBackend, "_download_blobs", counting)
    resolved = ct.load_settings(settings)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    ct.restore(run.ref.select(step=1), model=fresh, settings=resolved)
    assert len(downloaded) == 5  # four weights and the packed biases
    downloaded.clear()
    ct.restore(run.ref.select(step=2), model=fresh, settings=resolved)
    assert len(downloaded) == 1  # only the changed weight
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


# -- the SDK boundary, without a server ---------------------------------------------------------
def test_compat_shim_matches_the_installed_sdk() -> None:
    """The one SDK name outside MLflow's documented API (``_compat``): fails loudly when an
    MLflow release moves ``get_artifact_repository`` or changes what ckpt_track calls on a
    repository."""
    import inspect

    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from ckpt_track.backends.mlflow import _compat

    assert "tracking_uri" in inspect.signature(get_artifact_repository).parameters
    for method, params in _compat.REPOSITORY_CALLS.items():
        found = inspect.signature(getattr(ArtifactRepository, method)).parameters
        assert all(p in found for p in params), f"ArtifactRepository.{method}{tuple(found)}: ckpt_track passes {params}"
    repo = _compat.artifact_repository("file:///tmp/ckpt-track-compat-check", None)
    assert isinstance(repo, ArtifactRepository)


def test_handles_are_typed_and_frozen(tmp_path: Path) -> None:
    import dataclasses

    backend = MlflowBackend({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                             "artifact_location": str(tmp_path / "mlruns")})
    run = backend.open_run(RunSpec(project="handles"))
    assert isinstance(run.native, MlflowRun) and run.native.artifact_uri
    stored = backend.put(run, make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0)), aliases=("latest",))
    assert isinstance(stored.native, MlflowModel) and stored.native.model_id.startswith("m-")
    assert stored.native.registered_version is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        stored.native.model_id = "m-0"  # type: ignore[misc]


def test_error_table() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as pb

    from ckpt_track.backends.mlflow import MlflowSdk
    from ckpt_track.errors import AuthError, BackendError

    sdk = MlflowSdk("http://127.0.0.1:40329", None)
    cases = [
        (MlflowException("gone", error_code=pb.RESOURCE_DOES_NOT_EXIST), CheckpointNotFound, "tracking URI"),
        (MlflowException("no", error_code=pb.PERMISSION_DENIED), AuthError, "MLFLOW_TRACKING_TOKEN"),
        (MlflowException("API request failed with error code 401 != 200"), AuthError, "credentials"),
        (MlflowException("bad", error_code=pb.INVALID_PARAMETER_VALUE), BackendError, "rejected"),
        (MlflowException("at http://127.0.0.1:40329: 503"), BackendUnavailable, "unreachable or failing"),
        (ConnectionRefusedError("refused"), BackendUnavailable, "cannot reach"),
    ]
    for exc, kind, text in cases:
        got = sdk.translate(exc, "doing it")
        assert type(got) is kind and text in str(got), (exc, got)
    with pytest.raises(CheckpointNotFound) as info, sdk.errors("looking"):
        raise MlflowException("gone", error_code=pb.RESOURCE_DOES_NOT_EXIST)
    assert isinstance(info.value.__cause__, MlflowException)


def test_unknown_option_names_the_known_ones() -> None:
    from ckpt_track.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['tracking_url'\].*Did you mean 'tracking_uri'"):
        MlflowBackend({"tracking_url": "http://x"})
