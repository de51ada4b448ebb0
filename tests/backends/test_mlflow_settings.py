"""MLflow's own settings are the defaults and ckpt_track's settings override them, against the
real server; a reference resolved with nothing configured never creates a store; Databricks
UI URLs map to the tracking URI ``databricks`` (no network)."""

from __future__ import annotations

import base64
import http.server
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from mlflow import MlflowClient

import ckpt_track as ct
from ckpt_track.backends.mlflow import MlflowBackend
from ckpt_track.errors import AuthError, BackendUnavailable, ConfigError
from ckpt_track.records import RunSpec
from ckpt_track.refs import parse_ref
from ckpt_track.resolve import open_backend
from ckpt_track.testing.contract import blob_state, make_blob_checkpoint

RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SDK_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
            "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET",
            "DATABRICKS_CONFIG_FILE", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_RUNTIME_VERSION",
            "DATABRICKS_AUTH_TYPE", "DATABRICKS_USERNAME", "DATABRICKS_PASSWORD")


@pytest.fixture(autouse=True)
def _no_sdk_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in SDK_VARS:  # set first, so that whatever a test (or the backend) sets is undone
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _dead_uri() -> str:
    from mlflow_server import free_port

    return f"http://127.0.0.1:{free_port()}"


# -- bug 7: nothing configured ---------------------------------------------------------------
def test_a_reference_with_no_tracking_uri_is_a_config_error_and_creates_no_store(tmp_path: Path) -> None:
    """Issue 15, bug 7: ``ct.restore("runs:/<id>/best")`` with nothing set created ./mlflow.db and
    said "not found (tracking URI the default MLflow tracking URI)".  In a fresh process, where
    mlflow.set_tracking_uri was never called."""
    code = textwrap.dedent(f"""
        import ckpt_track as ct
        from ckpt_track.errors import ConfigError
        try:
            ct.restore("runs:/{RUN}/best")
        except ConfigError as exc:
            print("ConfigError:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_TRACK_", "MLFLOW_"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    assert out.startswith("ConfigError:") and "MLFLOW_TRACKING_URI" in out and "[mlflow] tracking_uri" in out, out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_messages_never_say_the_default_uri_without_naming_the_setting() -> None:
    where = MlflowBackend({}).sdk.where
    assert "MLFLOW_TRACKING_URI" in where and "[mlflow] tracking_uri" in where


# -- tracking URI ----------------------------------------------------------------------------
def test_mlflow_tracking_uri_is_the_default_and_the_setting_wins(mlflow_env, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env.uri)
    project = _unique("env-uri")
    with ct.init(project=project, backend="mlflow", monitor=None) as run:  # nothing in ckpt_track's settings
        run.log_checkpoint(1, model=torch.nn.Linear(2, 2))
    assert MlflowClient(mlflow_env.uri).get_run(run.id).info.run_name == run.name
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())  # the SDK's setting points elsewhere
    assert MlflowBackend({"tracking_uri": mlflow_env.uri}).tracking_uri == mlflow_env.uri
    s = ct.load_settings({"mlflow": {"tracking_uri": mlflow_env.uri}})
    assert [c.step for c in ct.list_checkpoints(run.ref, s)] == [1]


# -- experiment ------------------------------------------------------------------------------
def test_mlflow_experiment_name_is_the_default_and_ckpt_track_settings_win(mlflow_env, monkeypatch) -> None:
    client = MlflowClient(mlflow_env.uri)
    from_env, from_setting, from_project = _unique("exp-env"), _unique("exp-set"), _unique("exp-proj")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", from_env)
    backend = MlflowBackend({"tracking_uri": mlflow_env.uri})
    run = backend.open_run(RunSpec(project="default"))  # no project given: ckpt_track's placeholder
    assert run.project == from_env and client.get_experiment_by_name(from_env) is not None
    assert backend.open_run(RunSpec(project=from_project)).project == from_project  # project= wins
    configured = MlflowBackend({"tracking_uri": mlflow_env.uri, "experiment": from_setting})
    assert configured.open_run(RunSpec(project=from_project)).project == from_setting  # [mlflow] experiment wins


def test_mlflow_experiment_id_is_the_default(mlflow_env, monkeypatch) -> None:
    name = _unique("exp-id")
    exp_id = MlflowClient(mlflow_env.uri).create_experiment(name)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
    backend = MlflowBackend({"tracking_uri": mlflow_env.uri})
    run = backend.open_run(RunSpec(project="default"))
    assert run.project == name and run.native.experiment_id == exp_id
    other = _unique("exp-id-set")
    assert MlflowBackend({"tracking_uri": mlflow_env.uri, "experiment": other}).open_run(
        RunSpec(project="default")).project == other


# -- registry URI ----------------------------------------------------------------------------
def test_mlflow_registry_uri_is_the_default_and_the_setting_wins(tmp_path: Path, mlflow_env, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = _dead_uri()
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", dead)
    name = _unique("reg")
    ckpt = make_blob_checkpoint(tmp_path, 1, blob_state(0))
    defaulted = MlflowBackend({"tracking_uri": mlflow_env.uri, "register_as": name})
    assert defaulted.sdk.registry_uri == dead
    run = defaulted.open_run(RunSpec(project=_unique("reg-default")))
    with pytest.raises(BackendUnavailable):  # registering went to the registry the SDK's variable names
        defaulted.put(run, ckpt)

    configured = MlflowBackend({"tracking_uri": mlflow_env.uri, "registry_uri": mlflow_env.uri, "register_as": name})
    run = configured.open_run(RunSpec(project=_unique("reg-set")))
    stored = configured.put(run, ckpt)
    assert stored.native.registered_version == "1"
    assert MlflowClient(mlflow_env.uri, registry_uri=mlflow_env.uri).get_model_version(name, "1").source == \
        f"models:/{stored.native.model_id}"


# -- credentials: passed through to the SDK --------------------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        body = b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """A loopback HTTP server that answers 401 and records each request's Authorization header."""
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("env,header", [
    ({"MLFLOW_TRACKING_TOKEN": "tok-123"}, "Bearer tok-123"),
    ({"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "pw"},
     "Basic " + base64.b64encode(b"ann:pw").decode()),
])
def test_mlflow_credentials_reach_the_server(refusing_server: str, monkeypatch, env, header) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = ct.load_settings({"mlflow": {"tracking_uri": refusing_server}})
    with pytest.raises(AuthError, match="MLFLOW_TRACKING_TOKEN"):
        ct.list_checkpoints(f"mlflow://{RUN}", s)
    assert _Recorder.seen and set(_Recorder.seen) == {header}


# -- Databricks ------------------------------------------------------------------------------
WORKSPACE = "https://dbc-1234abcd-5678.cloud.databricks.com"


@pytest.mark.parametrize("host", [WORKSPACE, "https://adb-1234567890123456.7.azuredatabricks.net",
                                  "https://1234567890123456.7.gcp.databricks.com"])
def test_a_databricks_ui_maps_to_the_databricks_tracking_uri(host: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    backend = MlflowBackend({"ui": host})
    assert backend.tracking_uri == "databricks"
    assert os.environ["DATABRICKS_HOST"] == host
    with pytest.raises(ConfigError, match="DATABRICKS_TOKEN") as info:
        backend.check_configured()
    assert ".databrickscfg" in str(info.value)
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-x")
    backend.check_configured()  # credentials there: no error, and no network call made


def test_a_pasted_databricks_url_opens_a_databricks_backend(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".databrickscfg").write_text("[DEFAULT]\nhost = x\ntoken = y\n")
    monkeypatch.setenv("DATABRICKS_HOST", "https://mine.cloud.databricks.com")  # the user's own: kept
    ref = parse_ref(f"{WORKSPACE}/ml/experiments/123/runs/{RUN}")
    assert ref.params == (("ui", WORKSPACE),)
    backend = open_backend("mlflow", ct.load_settings({}), ref)
    assert backend.tracking_uri == "databricks"
    assert os.environ["DATABRICKS_HOST"] == "https://mine.cloud.databricks.com"


def test_a_configured_tracking_uri_wins_over_a_databricks_ui(monkeypatch) -> None:
    assert MlflowBackend({"ui": WORKSPACE, "tracking_uri": "http://127.0.0.1:5000"}).tracking_uri == \
        "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks://prod")
    assert MlflowBackend({"ui": "http://127.0.0.1:5000"}).tracking_uri == "databricks://prod"
    assert "DATABRICKS_HOST" not in os.environ
    assert MlflowBackend({"ui": "http://mlflow.internal:5000"}).tracking_uri == "databricks://prod"


def test_a_databricks_profile_is_not_overridden_and_other_auth_is_accepted(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".databrickscfg").write_text("[DEFAULT]\nhost = x\ntoken = y\n")
    backend = MlflowBackend({"ui": WORKSPACE})
    assert backend.tracking_uri == "databricks"
    assert "DATABRICKS_HOST" not in os.environ  # it would make the SDK skip the profile's token
    backend.check_configured()
    (tmp_path / ".databrickscfg").unlink()
    for env in ({"DATABRICKS_RUNTIME_VERSION": "15.4"}, {"DATABRICKS_AUTH_TYPE": "azure-cli"},
                {"DATABRICKS_USERNAME": "u", "DATABRICKS_PASSWORD": "p"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            MlflowBackend({"ui": WORKSPACE}).check_configured()  # a notebook, azure-cli, basic auth: no error
