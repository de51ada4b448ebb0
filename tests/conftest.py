from __future__ import annotations

import os

import pytest

# comet_ml, once imported (transformers imports it when installed), patches other SDKs to
# copy what they log into Comet experiments; keep it from doing that in every other test
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own working directory with no ckpt_track settings from outside."""
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    import ckpt_track.run as run_mod

    if run_mod._active is not None:
        run_mod._active.finish()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow server (sqlite store, served artifacts, job runner off) per test session."""
    from mlflow_server import MlflowServer, free_port

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_env(monkeypatch, mlflow_server):
    """Client settings for tests talking to the session server: fail fast instead of retrying for minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return mlflow_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS ``weed mini``) per test session."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3-server")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_root(monkeypatch, s3_server, request):
    """A fresh ``s3://`` prefix in the session server's bucket, with the standard AWS variables
    pointing at the server (as a user's environment would)."""
    import uuid

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{s3_server.bucket}/{request.node.name[:40].strip('[]')}-{uuid.uuid4().hex[:8]}"
