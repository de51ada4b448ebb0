"""comet_ml's own settings are the Comet backend's defaults; ckpt_track's settings win.

Each setting is shown both ways: the SDK's (environment or ``$COMET_CONFIG`` file) used when
``[comet]`` says nothing, and ``[comet]`` winning when both are given.  Offline through the real
SDK (its archive and the offline store are read back); online against the loopback fake server.
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_track as ct
from ckpt_track.backends.comet import CometBackend
from ckpt_track.records import RunSpec
from tests.backends import test_backend_comet as _comet
from tests.fakes.comet import API_KEY, FakeComet

fake_server, comet_env = _comet.fake_server, _comet.comet_env  # the fixtures of the backend's tests


@pytest.fixture
def offline_env(comet_env: FakeComet, monkeypatch: pytest.MonkeyPatch) -> FakeComet:
    """No API key: an online start would be an AuthError, as in the report."""
    monkeypatch.delenv("COMET_API_KEY")
    return comet_env


def _config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "comet.config"
    path.write_text(text)
    monkeypatch.setenv("COMET_CONFIG", str(path))


def _log_one(settings: dict[str, Any], project: str = "p", name: str = "r") -> ct.Run:
    with ct.init(project=project, name=name, settings={"backend": "comet", "comet": settings}) as run:
        run.log_checkpoint(1, model=torch.nn.Linear(2, 1), blocking=True).wait()
    return run


def _archive(directory: Path, run: ct.Run) -> dict[str, Any]:
    with zipfile.ZipFile(directory / f"{run.info.native.key}.zip") as z:
        return json.loads(z.read("experiment.json"))


# -- online / offline -----------------------------------------------------------------------------
@pytest.mark.parametrize("var,value", [("COMET_OFFLINE", "true"), ("COMET_START_ONLINE", "false"),
                                       ("COMET_OFFLINE", "1")])
def test_comets_offline_variables_select_offline(offline_env: FakeComet, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    run = _log_one({"offline_directory": str(tmp_path / "off")})
    assert (tmp_path / "off" / f"{run.info.native.key}.zip").is_file()
    assert offline_env.requests == []


@pytest.mark.parametrize("text", ["[comet]\noffline = true\n", "[comet_start]\nonline = false\n"])
def test_comets_config_file_selects_offline(offline_env: FakeComet, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    _config_file(tmp_path, monkeypatch, text)
    run = _log_one({"offline_directory": str(tmp_path / "off")})
    assert (tmp_path / "off" / f"{run.info.native.key}.zip").is_file()
    assert offline_env.requests == []


def test_start_online_is_read_before_offline(offline_env: FakeComet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # what comet_ml.start reads decides
    monkeypatch.setenv("COMET_OFFLINE", "false")
    assert CometBackend({}).mode.online is False


def test_ckpt_track_online_wins_over_comets_offline(comet_env: FakeComet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_OFFLINE", "true")
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("CKPT_TRACK_COMET__ONLINE", "true")
    run = _log_one({"workspace": "ws"})
    assert run.info.native.key in comet_env.experiments  # on the (fake) server


def test_ckpt_track_offline_wins_over_comets_online(offline_env: FakeComet, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_START_ONLINE", "true")
    run = _log_one({"online": False, "offline_directory": str(tmp_path / "off")})
    assert (tmp_path / "off" / f"{run.info.native.key}.zip").is_file() and offline_env.requests == []


# -- workspace, project, offline directory ----------------------------------------------------------
def _offline_backend(tmp_path: Path, **opts: Any) -> CometBackend:
    return CometBackend({"online": False, "offline_directory": str(tmp_path / "off"), **opts})


def test_workspace_from_comet_workspace_unless_configured(offline_env: FakeComet, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_WORKSPACE", "team")
    run = _log_one({"online": False, "offline_directory": str(tmp_path / "off")})
    assert _archive(tmp_path / "off", run)["workspace"] == "team"
    assert str(run.ref).startswith("comet://team/p/")
    run = _log_one({"online": False, "offline_directory": str(tmp_path / "off"), "workspace": "mine"}, name="r2")
    assert _archive(tmp_path / "off", run)["workspace"] == "mine"


def test_workspace_from_the_config_file(offline_env: FakeComet, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _config_file(tmp_path, monkeypatch, "[comet]\nworkspace = filed\n")
    assert _offline_backend(tmp_path).workspace == "filed"
    assert _offline_backend(tmp_path, workspace="mine").workspace == "mine"


def test_project_from_comet_project_name_only_when_none_is_named(offline_env: FakeComet, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_PROJECT_NAME", "from-comet")
    be = _offline_backend(tmp_path)
    assert be.open_run(RunSpec(project="default")).project == "from-comet"  # ct.init() without project=
    assert be.open_run(RunSpec(project="named")).project == "named"  # ct.init(project="named") wins
    be.close()
    configured = _offline_backend(tmp_path, project="configured")
    assert configured.open_run(RunSpec(project="default")).project == "configured"
    configured.close()


def test_offline_directory_from_comet_unless_configured(offline_env: FakeComet, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "env-dir"))
    assert CometBackend({"online": False}).offline_directory == tmp_path / "env-dir"
    monkeypatch.delenv("COMET_OFFLINE_DIRECTORY")
    _config_file(tmp_path, monkeypatch, f"[comet]\noffline_directory = {tmp_path / 'file-dir'}\n")
    run = _log_one({"online": False})
    assert (tmp_path / "file-dir" / f"{run.info.native.key}.zip").is_file()
    assert CometBackend({"online": False, "offline_directory": str(tmp_path / "mine")}).offline_directory == \
        tmp_path / "mine"


# -- server and API key (online) ------------------------------------------------------------------------
def test_url_override_is_used_unless_url_is_configured(comet_env: FakeComet,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = _log_one({"workspace": "ws"})  # comet_env points COMET_URL_OVERRIDE at the fake
    assert run.info.native.key in comet_env.experiments
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{dead}/clientlib/")
    run = _log_one({"workspace": "ws", "url": comet_env.url}, name="r2")  # [comet] url wins
    assert run.info.native.key in comet_env.experiments
    assert dict(run.ref.params) == {"url": comet_env.url}


def test_api_key_from_comets_config_file(comet_env: FakeComet, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMET_API_KEY")
    _config_file(tmp_path, monkeypatch, f"[comet]\napi_key = {API_KEY}\n")
    run = _log_one({"workspace": "ws"})
    assert run.info.native.key in comet_env.experiments



def test_building_a_backend_for_another_server_leaves_the_process_server_alone(monkeypatch) -> None:
    monkeypatch.delenv("COMET_URL_OVERRIDE", raising=False)
    CometBackend({"url": "https://comet.example.com", "online": False})
    assert "COMET_URL_OVERRIDE" not in os.environ  # set only when that backend talks to its server
