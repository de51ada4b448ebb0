"""``[storage] url`` with every tracker: the tensor files go to a real S3 server (SeaweedFS),
the tracker holds a small record (step, metrics, aliases, lineage, state.json and a pointer),
and restore by step fetches from the bucket, bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from fakes.clearml import CONFIG_FILE
from helpers import offline_trackers_env

import ckpt_track as ct
from ckpt_track.errors import IntegrityError
from ckpt_track.objstore import ObjectStore

WORKER = Path(__file__).with_name("record_worker.py")
BACKENDS = ("local", "mlflow", "wandb", "clearml", "comet")


def _env(work: Path, s3_server, url: str, mlflow_uri: str) -> dict[str, str]:
    env = offline_trackers_env(work, mlflow_uri, CONFIG_FILE, drop=("AWS_",))
    env.update(s3_server.env())
    env.update({"CKPT_TRACK_STORAGE__URL": url, "XDG_CACHE_HOME": str(work / "cache")})
    return env


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, s3_server, mlflow_server) -> tuple[Path, str, dict]:
    work = tmp_path_factory.mktemp("bucketed")
    url = f"s3://{s3_server.bucket}/shared-{work.name}"
    env = _env(work, s3_server, url, mlflow_server.uri)
    seen = {}
    for backend in BACKENDS:
        done = subprocess.run([sys.executable, str(WORKER)], cwd=work, env={**env, "CKPT_TRACK_BACKEND": backend},
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{backend}: {done.stderr[-3000:]}"
        seen[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    return work, url, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tracker_restores_by_step_from_the_bucket(logged, backend: str) -> None:
    _, _, seen = logged
    got = seen[backend]
    assert got["equal"] == {"1": True, "2": True, "3": True}
    assert [step for step, _ in got["listed"]] == [1, 2, 3]
    assert "latest" in got["listed"][-1][1] and "best" in got["listed"][-1][1]


def test_the_tensors_are_stored_once_for_every_tracker(logged, s3_server, monkeypatch) -> None:
    """Five trackers logged the same training: the bucket holds each file once (by content),
    every object is referenced, and there is a record per tracker version."""
    _, url, _ = logged
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    fs = s3_server.filesystem()
    prefix = url.removeprefix("s3://")
    records = fs.find(f"{prefix}/records")
    assert {r.split("/records/", 1)[1].split("/", 1)[0] for r in records} == set(BACKENDS)
    assert len(records) == 3 * len(BACKENDS)
    store = ObjectStore(url)
    assert store.referenced() == set(fs.find(f"{prefix}/objects"))  # every object is in use, none missing


def test_mlflow_holds_the_record_not_the_tensors(logged, mlflow_server) -> None:
    from mlflow import MlflowClient

    _, _, seen = logged
    client = MlflowClient(mlflow_server.uri)
    run_id = seen["mlflow"]["ref"].removeprefix("mlflow://")
    models = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                         filter_string=f"source_run_id='{run_id}'")
    assert len(models) == 3
    _, url, _ = logged
    assert {m.tags.get("ckpt_track.storage") for m in models} == {url}  # the UI shows where the files are
    assert all(int(m.tags["ckpt_track.storage_size"]) > int(m.tags["ckpt_track.size"]) for m in models)
    names = set()
    for m in models:
        names |= {a.path.rsplit("/", 1)[-1] for a in client.list_logged_model_artifacts(m.model_id)}
    assert {"objects.json", "state.json", "manifest.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)


def test_wandb_offline_artifact_holds_the_pointer(logged) -> None:
    from fakes.wandb import finished_records

    work, _, _ = logged
    logs = sorted((work / "wb").rglob("run-*.wandb"))
    assert logs
    names, metadata = set(), []
    for rec in finished_records(logs[-1]):
        if rec.WhichOneof("record_type") == "artifact":
            names |= {e.path for e in rec.artifact.manifest.contents}
            metadata.append(json.loads(rec.artifact.metadata))
    assert "objects.json" in names and not any(n.endswith(".safetensors") for n in names)
    _, url, _ = logged
    assert metadata and all(url in json.dumps(m) for m in metadata)  # the artifact's metadata names the bucket


def test_a_corrupted_object_fails_the_restore_of_a_tracker_record(logged, s3_server, mlflow_server,
                                                                   monkeypatch) -> None:
    work, url, seen = logged
    env = _env(work, s3_server, url, mlflow_server.uri)
    for key, value in env.items():
        if key.startswith(("CKPT_TRACK_", "AWS_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "other-cache"))  # nothing cached: fetched from the bucket
    ref = seen["mlflow"]["ref"]
    fs = s3_server.filesystem()
    store = ObjectStore(url)
    record = fs.find(f"{url.removeprefix('s3://')}/records/mlflow")[0]
    from ckpt_track.format import is_blob, parse_manifest

    manifest = parse_manifest(fs.cat_file(record))
    entry = max((e for f, e in manifest.files.items() if is_blob(f)), key=lambda e: e.size)
    key = store.object_path(entry)
    good = fs.cat_file(key)
    fs.pipe_file(key, good[:-1] + bytes([good[-1] ^ 1]))
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(IntegrityError):
            ct.restore(f"{ref}@step={manifest.step}", model=model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    finally:
        fs.pipe_file(key, good)


def test_comet_offline_archive_lists_the_objects_as_remote_assets(logged) -> None:
    """Comet shows a record's files natively: one remote asset per file, pointing at the object."""
    work, url, _ = logged
    (archive,) = sorted((work / "comet").glob("*.zip"))
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines() if line.strip()]
    remote = [m["payload"] for m in messages if m.get("type") == "remote_file"]
    assert len({p["metadata"]["checkpoint"] for p in remote}) == 3  # every checkpoint lists its objects
    assert all(p["remote_uri"] == f"{url}/objects/{p['metadata']['xxh3']}" for p in remote)
    assert any(p["additional_params"]["fileName"].endswith(".safetensors") for p in remote)
    uploaded = [m["payload"] for m in messages if m.get("type") == "file_upload"]
    names = [p["additional_params"]["fileName"] for p in uploaded]
    assert "objects.json" in names and not any(n.endswith(".safetensors") for n in names)  # no tensor bytes
