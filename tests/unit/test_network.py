"""ckpt_track.network: SDK timeouts/retries/telemetry, and an unreachable tracker failing fast."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import ckpt_track as ct
from ckpt_track import network
from ckpt_track.errors import BackendUnavailable

RUN = "3f" * 16
VARS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_DISABLE_TELEMETRY", "WANDB_HTTP_TIMEOUT",
        "WANDB__GRAPHQL_RETRY_MAX", "WANDB_ERROR_REPORTING", "COMET_TIMEOUT_HTTP", "COMET_HTTP_SESSION_RETRY_TOTAL",
        "COMET_ERROR_TRACKING_ENABLE", "MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    network._reset_for_tests()
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    network._reset_for_tests()


def test_configure_sets_every_sdk_knob() -> None:
    network.configure(ct.Settings())
    env = os.environ
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2" and env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["WANDB_HTTP_TIMEOUT"] == "2" and env["WANDB__GRAPHQL_RETRY_MAX"] == "2"
    assert env["WANDB_ERROR_REPORTING"] == "false"
    assert env["COMET_TIMEOUT_HTTP"] == "2" and env["COMET_HTTP_SESSION_RETRY_TOTAL"] == "2"
    assert env["COMET_ERROR_TRACKING_ENABLE"] == "false"
    assert set(network.applied()) >= {"MLFLOW_HTTP_REQUEST_TIMEOUT", "WANDB_ERROR_REPORTING"}


def test_the_users_own_settings_win_except_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "1.0")
    network.configure(ct.Settings())
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0"  # it would draw from the global random
    text = network.describe()
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT=60" in text and "jitter" in text and "CKPT_TRACK_TIMEOUT" in text


def test_configure_is_idempotent_and_follows_new_settings() -> None:
    first = network.configure(ct.Settings())
    del os.environ["WANDB_HTTP_TIMEOUT"]
    os.environ.pop("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")
    assert network.configure(ct.Settings()) == first  # same settings: the same plan ...
    assert "WANDB_HTTP_TIMEOUT" in os.environ  # ... and what went missing is put back,
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0"  # the forced jitter above all
    network.configure(ct.Settings(timeout=30.0, retries=1))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15"  # ours: replaced
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


@pytest.mark.parametrize(("timeout", "retries", "worst"), [(10, 2, 10), (2, 2, 3), (30, 0, 30), (5, 7, 8)])
def test_the_plan_stays_within_the_budget(timeout: float, retries: int, worst: float) -> None:
    p = network.plan(timeout, retries)
    backoff = p.backoff_factor * (2**retries - 2) if retries >= 2 else 0
    assert (retries + 1) * p.attempt_seconds + backoff <= worst


def test_private_random_leaves_the_global_generator_alone() -> None:
    retry = pytest.importorskip("wandb.sdk.lib.retry")
    assert retry.random is random or isinstance(retry.random, random.Random)  # the SDK draws from `random`
    network.private_random(retry)
    assert isinstance(retry.random, random.Random)
    state = random.getstate()
    retry.random.random()
    assert random.getstate() == state


def test_comet_import_keeps_the_global_generator() -> None:
    """``import comet_ml`` draws random.random(); the comet backend's import must not show."""
    pytest.importorskip("comet_ml")
    code = ("import random; random.seed(7); want = random.random(); random.seed(7)\n"
            "from ckpt_track.backends.comet import CometBackend; CometBackend({'online': False})._sdk()\n"
            "assert random.random() == want, 'importing comet_ml consumed the global random generator'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- an unreachable MLflow server -------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def blackhole() -> Iterator[int]:
    """Accepts connections (the kernel completes the handshake) and never reads or answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


def _restore_fails_fast(port: int, limit: float) -> tuple[BackendUnavailable, float]:
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{port}"
    settings = ct.load_settings({"mlflow": {"tracking_uri": uri}})
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        ct.restore(f"mlflow://{RUN}@latest", settings=settings)
    took = time.monotonic() - start
    assert took < limit, f"took {took:.1f} s"
    msg = str(info.value)
    assert uri in msg and "CKPT_TRACK_TIMEOUT" in msg and "MLFLOW_TRACKING_URI" in msg, msg
    assert "\n" not in msg.strip()
    return info.value, took


def test_closed_port_fails_within_the_timeout() -> None:
    _restore_fails_fast(_closed_port(), 15)


def test_blackhole_fails_within_the_timeout(blackhole: int) -> None:
    _, took = _restore_fails_fast(blackhole, 15)
    assert took >= 1  # it did wait for an answer


def test_ckpt_track_timeout_is_honoured(blackhole: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_TRACK_TIMEOUT", "2")
    _, took = _restore_fails_fast(blackhole, 6)


def test_retries_draw_nothing_from_the_global_generator() -> None:
    pytest.importorskip("mlflow")
    random.seed(3)
    state = random.getstate()
    with pytest.raises(BackendUnavailable):  # two retries: urllib3 would add jitter to the second backoff
        ct.restore(f"mlflow://{RUN}", settings=ct.load_settings({"mlflow": {"tracking_uri": f"http://127.0.0.1:{_closed_port()}"}}))
    assert random.getstate() == state


def test_cli_against_a_blackhole_fails_with_one_error(blackhole: int, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mlflow")
    from ckpt_track.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{blackhole}")
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["ls", f"mlflow://{RUN}"])
    assert time.monotonic() - start < 15
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert f"127.0.0.1:{blackhole}" in err and "CKPT_TRACK_TIMEOUT" in err, err
