"""Hosted trackers' web-UI URLs (issue 15, bug 6): Databricks MLflow, W&B Dedicated Cloud,
Comet's model registry, ClearML app hosts; and an ambiguous self-hosted URL, matched by the
configured servers first, else refused with the candidates' canonical forms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_track import InvalidRef, Ref, parse_ref
from ckpt_track.backends.mlflow.refs import is_databricks_host
from ckpt_track.backends.registry import hosted_backend

RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
MODEL = "m-7a6b5c4d3e2f10293847566574839201"
TID = "4a1b2c3d4e5f60718293a4b5c6d7e8f9"
DBX = "https://acme.cloud.databricks.com"
AZ = "https://adb-1234567890123456.7.azuredatabricks.net"
GCP = "https://1234567890123456.7.gcp.databricks.com"
SERVER_VARS = ("MLFLOW_TRACKING_URI", "WANDB_BASE_URL", "COMET_URL_OVERRIDE", "CLEARML_WEB_HOST", "CLEARML_API_HOST",
               "DATABRICKS_HOST")


@pytest.fixture(autouse=True)
def no_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No configured server anywhere: the working directory has no ckpt_track.toml."""
    for var in [*SERVER_VARS, *(k for k in os.environ if k.startswith("CKPT_TRACK_"))]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def _ui(base: str) -> tuple[tuple[str, str], ...]:
    return (("ui", base),)


HOSTED = [
    # Databricks: what MLflow's SDK prints at the end of a run, and the older fragment pages
    (f"{DBX}/ml/experiments/1234567890/runs/{RUN}", Ref("mlflow", RUN, params=_ui(DBX))),
    (f"{DBX}/ml/experiments/1234567890/runs/{RUN}/artifacts?o=42", Ref("mlflow", RUN, params=_ui(DBX))),
    (f"{AZ}/ml/experiments/12/runs/{RUN}?o=1234567890123456", Ref("mlflow", RUN, params=_ui(AZ))),
    (f"{GCP}/ml/experiments/12/runs/{RUN}", Ref("mlflow", RUN, params=_ui(GCP))),
    (f"{DBX}/ml/experiments/12/models/{MODEL}?o=42", Ref("mlflow", f"models/{MODEL}", params=_ui(DBX))),
    (f"{DBX}/ml/models/resnet-ckpt/versions/4", Ref("mlflow", "registered/resnet-ckpt", version=4, params=_ui(DBX))),
    (f"{DBX}/explore/data/models/main/vision/resnet/version/3",
     Ref("mlflow", "registered/main.vision.resnet", version=3, params=_ui(DBX))),
    (f"{DBX}/?o=42#mlflow/experiments/12/runs/{RUN}", Ref("mlflow", RUN, params=_ui(DBX))),
    (f"{AZ}/?o=1#mlflow/experiments/12/runs/{RUN}/artifactPath/ckpt_track", Ref("mlflow", RUN, params=_ui(AZ))),
    (f"{DBX}#mlflow/models/resnet-ckpt/versions/2", Ref("mlflow", "registered/resnet-ckpt", version=2, params=_ui(DBX))),
    # W&B Dedicated Cloud: its own server, kept as base_url
    ("https://acme.wandb.io/acme/resnet/runs/3k2j1x",
     Ref("wandb", "acme/resnet/3k2j1x", params=(("base_url", "https://acme.wandb.io"),))),
    ("https://acme.wandb.io/acme/resnet/artifacts/model/ckpt-3k2j1x/v2",
     Ref("wandb", "acme/resnet/3k2j1x", version=3, params=(("base_url", "https://acme.wandb.io"),))),
    # Comet model registry, cloud and self-hosted
    ("https://www.comet.com/acme/model-registry/resnet-ckpt", Ref("comet", "registry/acme/resnet-ckpt")),
    ("https://www.comet.com/acme/model-registry/resnet-ckpt/2.0.0",
     Ref("comet", "registry/acme/resnet-ckpt", alias="2.0.0")),
    ("https://www.comet.com/acme/model-registry/resnet-ckpt/1.2.0/assets",
     Ref("comet", "registry/acme/resnet-ckpt", alias="1.2.0")),
    ("https://comet.corp.example/acme/model-registry/resnet-ckpt/2.0.0",
     Ref("comet", "registry/acme/resnet-ckpt", alias="2.0.0", params=(("url", "https://comet.corp.example"),))),
    # ClearML: the hosted app, its demo servers and a self-hosted web host
    (f"https://app.clear.ml/projects/*/experiments/{TID}/output/log", Ref("clearml", TID)),
    (f"https://demoapp.demo.clear.ml/projects/216431/experiments/{TID}/output/log", Ref("clearml", TID)),
    (f"https://clearml.corp.example/projects/7c0f/tasks/{TID}/info-output/metrics", Ref("clearml", TID)),
]


@pytest.mark.parametrize(("text", "want"), HOSTED, ids=[t[:70] for t, _ in HOSTED])
def test_hosted_tracker_urls_parse(text: str, want: Ref) -> None:
    assert parse_ref(text) == want
    assert parse_ref(str(want)) == want


def test_a_databricks_run_page_is_no_wandb_run() -> None:
    """Bug 6: this was wandb://experiments/1234567890/<run>?base_url=https://...databricks.com/ml."""
    ref = parse_ref(f"{DBX}/ml/experiments/1234567890/runs/{RUN}")
    assert ref.backend == "mlflow" and ref.param("ui") == DBX


@pytest.mark.parametrize("text", [
    f"{DBX}/ml/experiments/1234567890",  # an experiment page: no run
    f"{DBX}/browse/folders/123",
    f"{DBX}/ml/experiments/12/runs/not-a-run-id",
    "https://acme.wandb.io/acme/resnet/reports/xyz",
    "https://www.comet.com/acme/model-registry",
    "https://app.clear.ml/dashboard",
])
def test_a_hosted_page_that_is_no_checkpoint_is_refused(text: str) -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref(text)
    message = str(info.value)
    assert "\n" not in message and message.endswith("(see `ckpt-track refs` for every form)"), message


AMBIGUOUS = f"https://ml.corp.example/ml/experiments/12/runs/{RUN}"  # Databricks' shape, or a W&B server under /ml


def test_an_ambiguous_self_hosted_url_asks_which_backend() -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref(AMBIGUOUS)
    message = str(info.value)
    assert "\n" not in message
    assert "could be a page of mlflow or wandb" in message
    assert f"mlflow://{RUN}?ui=https://ml.corp.example" in message
    assert f"wandb://experiments/12/{RUN}?base_url=https://ml.corp.example/ml" in message
    assert "MLFLOW_TRACKING_URI" in message and "WANDB_BASE_URL" in message
    # each suggested form parses to what it says
    assert parse_ref(f"mlflow://{RUN}?ui=https://ml.corp.example").backend == "mlflow"


@pytest.mark.parametrize(("var", "value", "backend"), [
    ("MLFLOW_TRACKING_URI", "https://ml.corp.example", "mlflow"),
    ("MLFLOW_TRACKING_URI", "https://ml.corp.example:443/", "mlflow"),
    ("WANDB_BASE_URL", "https://ml.corp.example/ml", "wandb"),
    ("CKPT_TRACK_MLFLOW__TRACKING_URI", "https://ml.corp.example", "mlflow"),
    ("CKPT_TRACK_WANDB__BASE_URL", "https://ml.corp.example", "wandb"),
])
def test_an_ambiguous_url_is_matched_by_the_configured_server(monkeypatch: pytest.MonkeyPatch, var: str,
                                                                 value: str, backend: str) -> None:
    monkeypatch.setenv(var, value)
    assert parse_ref(AMBIGUOUS).backend == backend


def test_the_config_file_server_decides_too(tmp_path: Path) -> None:
    (tmp_path / "ckpt_track.toml").write_text('[wandb]\nbase_url = "https://ml.corp.example"\n')
    assert parse_ref(AMBIGUOUS).backend == "wandb"


def test_the_port_decides_between_servers_on_one_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    assert parse_ref(f"http://localhost:8080/ml/experiments/1/runs/{RUN}").backend == "wandb"
    assert parse_ref(f"http://localhost:5000/ml/experiments/1/runs/{RUN}").backend == "mlflow"


def test_a_url_only_one_backend_claims_needs_no_setting() -> None:
    ref = parse_ref("https://wandb.corp.example/acme/resnet/runs/3k2j1x")
    assert ref == Ref("wandb", "acme/resnet/3k2j1x", params=(("base_url", "https://wandb.corp.example"),))


def test_hosts_of_hosted_trackers() -> None:
    assert hosted_backend("acme.cloud.databricks.com") == "mlflow"
    assert hosted_backend("adb-1.2.azuredatabricks.net") == "mlflow"
    assert hosted_backend("wandb.ai") == hosted_backend("acme.wandb.io") == "wandb"
    assert hosted_backend("www.comet.com") == "comet" and hosted_backend("app.clear.ml") == "clearml"
    assert hosted_backend("databricks.com.evil.example") is None and hosted_backend("notwandb.ai") is None
    assert is_databricks_host(f"{AZ}/ml/x") and not is_databricks_host("https://example.com")
