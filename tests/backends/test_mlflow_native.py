"""What MLflow's own client reads back from a ckpt_track checkpoint, against the real server:
the LoggedModel's params, alias tags and description (restore commands), its file listing, the
registry version's tags and description, the experiment type; no SDK log lines or progress
bars; ``mlflow://<experiment>/<run name>`` references; ``list_projects`` / ``list_runs``."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import ckpt_track as ct
from ckpt_track.backends.mlflow import MlflowBackend
from ckpt_track.backends.mlflow.native import LISTING, NOTE
from ckpt_track.errors import CheckpointNotFound
from ckpt_track.format import MANIFEST, is_blob
from ckpt_track.ops.copy import copy
from ckpt_track.records import RunSpec


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _settings(server, **extra: str) -> dict:
    return {"backend": "mlflow", "mlflow": {"tracking_uri": server.uri, **extra}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))


def test_each_logged_model_carries_its_step_aliases_config_description_and_file_listing(mlflow_env) -> None:
    project, registered = _unique("native"), _unique("native-ckpt")
    settings = _settings(mlflow_env, register_as=registered)
    model, opt = _model(), None
    with ct.init(project=project, name="n", config={"lr": 0.01, "optim": {"betas": "0.9,0.99"}},
                 settings=settings) as run:
        for step, loss in ((10, 0.5), (20, 0.3), (30, 0.1)):  # best moves 10 -> 20 -> 30
            run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": loss})
    client = MlflowClient(mlflow_env.uri)
    exp = client.get_experiment_by_name(project)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on model training
    models = {int(m.tags["step"]): m for m in client.search_logged_models([exp.experiment_id])}
    assert sorted(models) == [10, 20, 30]
    for step, m in models.items():
        assert m.params == {"lr": "0.01", "optim.betas": "0.9,0.99"}  # the run config
        note = m.tags[NOTE]
        assert f"step {step}" in note
        assert f"ckpt-track restore mlflow://{run.id}@step={step} -o DIR" in note
        assert f'ct.restore("mlflow://{run.id}@step={step}", model=model, optimizer=optimizer)' in note
        assert f"MLFLOW_TRACKING_URI={mlflow_env.uri}" in note
    # aliases moved off their old holders: tags and description
    assert models[30].tags["aliases"] == "best, latest, step-30"
    assert "Aliases: `best`, `latest`, `step-30`" in models[30].tags[NOTE]
    for old in (10, 20):
        assert models[old].tags["aliases"] == f"step-{old}"
        assert "ckpt_track.alias.best" not in models[old].tags and "`best`" not in models[old].tags[NOTE]
    # the registry versions: the same tags and description
    for step, m in models.items():
        mv = client.get_model_version(registered, m.tags["ckpt_track.registered_version"])
        assert mv.description == m.tags[NOTE]
        assert mv.tags["step"] == str(step) and mv.tags["aliases"] == m.tags["aliases"]
        assert {k for k in mv.tags if k.startswith("ckpt_track.alias.")} == \
            {k for k in m.tags if k.startswith("ckpt_track.alias.")}

    # the listing: each tensor file, where it is, its tensors; no tensor data
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{models[20].artifact_location}/{LISTING}",
                                                   tracking_uri=mlflow_env.uri))
    listing = json.loads(got.read_text())
    stored = {s.step: s for s in ct.list_checkpoints(run.ref, ct.load_settings(settings))}
    ckpt = MlflowBackend({"tracking_uri": mlflow_env.uri}).get(stored[20], mlflow_env.root / _unique("dl"))
    by_file = {f["file"]: f for f in listing["files"]}
    assert listing["step"] == 20 and set(by_file) == set(ckpt.manifest.files)
    names = set()
    for fname, entry in ckpt.manifest.files.items():
        assert by_file[fname]["size"] == entry.size
        if is_blob(fname):
            assert by_file[fname]["stored_in"] == "run artifacts ckpt_track/blobs/"
            names |= {t["name"] for group in by_file[fname]["tensors"].values() for t in group}
    assert {"model/0.weight", "model/1.bias"} <= names
    weight = next(t for f in listing["files"] for t in f.get("tensors", {}).get("model", [])
                  if t["name"] == "model/0.weight")
    assert weight == {"name": "model/0.weight", "dtype": "float32", "shape": [64, 64]}
    assert got.stat().st_size < 4096  # names and sizes only
    assert not (ckpt.path / LISTING).exists()  # the restored checkpoint holds its own files only
    assert sorted(p.name for p in ckpt.path.iterdir()) == sorted([*ckpt.manifest.files, MANIFEST])


def test_register_as_logs_nothing_and_restore_draws_no_progress_bars(mlflow_env, capfd) -> None:
    settings = _settings(mlflow_env, register_as=_unique("quiet-ckpt"))
    with ct.init(project=_unique("quiet"), name="q", settings=settings) as run:
        for step in (1, 2):
            run.log_checkpoint(step, model=_model())
    ct.restore(f"{run.ref}@step=1", model=_model(), settings=ct.load_settings(settings))
    err = capfd.readouterr().err
    assert "Waiting up to" not in err and "INFO mlflow" not in err, err
    assert "Downloading artifacts" not in err and "it/s" not in err, err


# -- mlflow://<experiment>/<run name> (issue 15, bug 11) ---------------------------------------
def test_a_copy_to_experiment_and_run_name_reads_back_by_the_same_text(tmp_path: Path, mlflow_env) -> None:
    raw = {**_settings(mlflow_env), "local": {"root": str(tmp_path / "store")}}
    settings = ct.load_settings(raw)
    with ct.init(project="src", name="a", backend="local", settings=raw) as src:
        for step in (1, 2):
            src.log_checkpoint(step, model=_model())
    target = f"mlflow://{_unique('copied')}/run-name"
    result = copy(f"{src.ref}", to=target, settings=settings)
    assert len(result.copied) == 2
    listed = ct.list_checkpoints(target, settings)  # was: "an MLflow run reference is mlflow://<run_id>"
    assert [s.step for s in listed] == [1, 2] and listed[0].run.run_id == result.target.run_id
    fresh = _model()
    assert ct.restore(f"{target}@step=2", model=fresh, settings=settings).step == 2


def test_several_runs_of_one_name_mean_the_newest_with_a_warning(mlflow_env) -> None:
    backend = MlflowBackend({"tracking_uri": mlflow_env.uri})
    project = _unique("dup")
    older = backend.open_run(RunSpec(project=project, name="same", resume="never"))
    newer = backend.open_run(RunSpec(project=project, name="same", resume="never"))
    with pytest.warns(UserWarning, match=rf"2 runs have that name; using the newest, {newer.run_id}.*{older.run_id}"):
        found = backend.find_run(ct.parse_ref(f"mlflow://{project}/same"))
    assert found.run_id == newer.run_id and found.name == "same" and found.project == project
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one run of the name: no warning
        only = backend.open_run(RunSpec(project=project, name="single"))
        assert backend.find_run(ct.parse_ref(f"mlflow://{project}/single")).run_id == only.run_id
    with pytest.raises(CheckpointNotFound, match=rf"no MLflow run named 'missing' in experiment '{project}'"):
        backend.find_run(ct.parse_ref(f"mlflow://{project}/missing"))
    with pytest.raises(CheckpointNotFound, match=rf"no MLflow experiment 'nope-x'.*{project}"):
        backend.find_run(ct.parse_ref("mlflow://nope-x/same"))


# -- list_projects / list_runs -----------------------------------------------------------------
def test_list_projects_and_runs(mlflow_env) -> None:
    backend = MlflowBackend({"tracking_uri": mlflow_env.uri})
    project = _unique("listing")
    first = backend.open_run(RunSpec(project=project, name="first"))
    second = backend.open_run(RunSpec(project=project, name="second"))
    MlflowClient(mlflow_env.uri).create_run(first.native.experiment_id, run_name="not-ours")  # no ckpt_track tag
    assert project in backend.list_projects()
    runs = backend.list_runs(project)
    assert [r.name for r in runs] == ["second", "first"]  # newest first, ckpt_track's runs only
    assert runs[0].run_id == second.run_id and runs[0].project == project
    assert backend.list(runs[0]) == []  # each one as find_run gives it
    with pytest.raises(CheckpointNotFound, match=rf"no MLflow experiment 'nope-y'.*{project}"):
        backend.list_runs("nope-y")


def test_show_displays_the_run_config_the_server_holds(mlflow_env, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ckpt_track.cli import app

    settings = _settings(mlflow_env)
    with ct.init(project=_unique("show-config"), name="cfg", config={"lr": 0.01, "optim": {"name": "adamw"}},
                 settings=settings) as run:
        run.log_checkpoint(1, model=_model())
    assert MlflowBackend({"tracking_uri": mlflow_env.uri}).run_config(run.info) == {"lr": "0.01", "optim.name": "adamw"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env.uri)
    out = CliRunner().invoke(app, ["show", f"mlflow://{run.id}@latest", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["config"] == {"lr": "0.01", "optim.name": "adamw"}
