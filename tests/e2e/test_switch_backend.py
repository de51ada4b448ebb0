"""One training script, five trackers: examples/switch_backend.py runs five times with only
CKPT_TRACK_BACKEND changed; each run's record is read back from that tracker's own output
(the local store, MLflow's own client, the W&B record log, the ClearML offline session, the
Comet offline archive), never through ckpt_track."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fakes.clearml import CONFIG_FILE, OfflineSession
from fakes.wandb import finished_records
from helpers import offline_trackers_env

EXAMPLE = Path(__file__).parents[2] / "examples" / "switch_backend.py"
STEPS = [4, 8, 12]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> tuple[Path, dict[str, list[dict]], str]:
    work = tmp_path_factory.mktemp("switch")
    # one configuration for all five; every run changes CKPT_TRACK_BACKEND only
    env = offline_trackers_env(work, mlflow_server.uri, CONFIG_FILE)
    printed: dict[str, list[dict]] = {}
    for backend in ("local", "mlflow", "wandb", "clearml", "comet"):
        done = subprocess.run([sys.executable, str(EXAMPLE)], cwd=work, env={**env, "CKPT_TRACK_BACKEND": backend},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{backend}: {done.stderr[-3000:]}"
        printed[backend] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return work, printed, mlflow_server.uri


def _expected(printed: dict[str, list[dict]]) -> dict[int, dict[str, float]]:
    return {p["step"]: p["metrics"] for p in printed["local"]}


def test_every_backend_logged_the_same_steps_and_metrics(runs) -> None:
    _, printed, _ = runs
    expected = _expected(printed)
    assert sorted(expected) == STEPS
    for backend, lines in printed.items():
        assert {p["backend"] for p in lines} == {backend}
        assert {p["step"]: p["metrics"] for p in lines} == expected, backend


def test_local_store_holds_the_checkpoints(runs) -> None:
    work, printed, _ = runs
    manifests = sorted((work / "store" / "switch").glob("*/checkpoints/v*/manifest.json"))
    got = {m["step"]: m["metrics"] for m in (json.loads(p.read_text()) for p in manifests)}
    assert got == _expected(printed)


def test_mlflow_has_a_logged_model_per_checkpoint(runs) -> None:
    from mlflow import MlflowClient

    _, printed, uri = runs
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("switch")
    run = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'switch-demo'")[0]
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id='{run.info.run_id}'")
    got = {int(m.tags["step"]): {x.key: x.value for x in m.metrics} for m in models}
    assert got == _expected(printed)


def test_wandb_record_log_holds_the_artifacts(runs) -> None:
    work, printed, _ = runs
    (log,) = sorted((work / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    arts = [r.artifact for r in finished_records(log) if r.WhichOneof("record_type") == "artifact"]
    got = {json.loads(a.metadata)["step"]: json.loads(a.metadata)["metrics"] for a in arts}
    assert got == _expected(printed)
    assert all(a.type == "model" for a in arts)


def test_clearml_offline_session_holds_the_checkpoints(runs) -> None:
    work, printed, _ = runs
    (archive,) = sorted((work / "clearml-cache" / "offline").glob("*.zip"))
    session = OfflineSession(archive)
    assert session.task["project_name"] == "switch"
    steps = {int(session.artifact_metadata(k)["step"]) for k in session.artifacts if k.startswith("ckpt-v")}
    assert steps == set(STEPS)
    # ClearML scalars are (title, series): "val/loss" is reported as title "val", series "loss"
    scalars = {(it, f"{title}/{series}"): val for title, series, it, val in session.scalars()}
    assert scalars == pytest.approx({(step, name): value for step, metrics in _expected(printed).items()
                                     for name, value in metrics.items()})


def test_comet_offline_archive_holds_the_checkpoints(runs) -> None:
    work, printed, _ = runs
    (archive,) = sorted((work / "comet").glob("*.zip"))
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines() if line.strip()]
    uploads = [m["payload"] for m in messages
               if m["type"] == "file_upload" and m["payload"].get("upload_type") == "model-element"]
    assert {p["additional_params"]["step"] for p in uploads} == set(STEPS)
    metric_steps: dict[int, dict[str, float]] = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            metric_steps.setdefault(metric["step"], {})[metric["metricName"]] = float(metric["metricValue"])
    for step, metrics in _expected(printed).items():
        for name, value in metrics.items():
            assert metric_steps[step][name] == pytest.approx(value), (step, name)
