"""W&B's own settings are the W&B backend's defaults; ckpt_track's settings win.

Each setting both ways: W&B's (environment, or the settings file ``wandb offline`` writes) used
when ``[wandb]`` says nothing, and ``[wandb]`` winning when both are given.  Offline through the
real SDK (the record log and the store are read back); the server URL through the fake client
surface of ``tests/fakes/wandb.py`` (what the backend hands the SDK decides where a run lands).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes.wandb import FakeWandb, finished_records

import ckpt_track as ct
from ckpt_track.backends.wandb import WandbBackend
from ckpt_track.records import RunSpec
from tests.backends import test_backend_wandb as _wandb
from tests.backends.test_backend_wandb import RUN, SELF_HOSTED

# the fixtures of the backend's tests: every W&B directory under tmp_path, no WANDB_* from outside
_wandb_service, wandb_env, fake = _wandb._wandb_service, _wandb.wandb_env, _wandb.fake

SAAS = "https://api.forge.coreweave.com"


# -- mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,mode", [("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline")])
def test_wandb_mode_is_the_default_mode(monkeypatch: pytest.MonkeyPatch, value: str, mode: str) -> None:
    monkeypatch.setenv("WANDB_MODE", value)
    assert WandbBackend({}).mode == mode
    assert WandbBackend({"mode": "online"}).mode == "online"  # ckpt_track's wins


def test_wandb_offline_command_selects_offline(tmp_path: Path) -> None:
    """``wandb offline`` writes ``mode = offline`` into $WANDB_DIR/wandb/settings (default ./wandb);
    WANDB_MODE is not set."""
    subprocess.run([str(Path(sys.executable).parent / "wandb"), "offline"], check=True, capture_output=True,
                   timeout=120)
    assert "mode = offline" in (Path(os.environ["WANDB_DIR"]) / "wandb" / "settings").read_text()
    with ct.init(project="resnet", name="r", settings={"backend": "wandb", "wandb": {"dir": str(tmp_path / "wb")}}) \
            as run:
        run.log_checkpoint(1, model=torch.nn.Linear(2, 1), blocking=True).wait()
    assert run.info.native.mode == "offline"
    log = next((tmp_path / "wb").glob(f"wandb/offline-run-*-{run.id}/run-{run.id}.wandb"))
    assert any(r.WhichOneof("record_type") == "artifact" for r in finished_records(log))
    assert WandbBackend({"mode": "disabled"}).mode == "disabled"  # ckpt_track's wins


# -- entity, project, dir ---------------------------------------------------------------------------
def test_wandb_entity_is_the_default_entity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ENTITY", "team")
    be = WandbBackend({"mode": "disabled", "dir": str(tmp_path)})
    assert str(be.open_run(RunSpec(project="p", run_id=RUN)).ref) == f"wandb://team/p/{RUN}"
    mine = WandbBackend({"mode": "disabled", "dir": str(tmp_path), "entity": "mine"})
    assert str(mine.open_run(RunSpec(project="p", run_id="other")).ref) == "wandb://mine/p/other"


def test_wandb_project_is_used_when_no_project_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "from-wandb")
    be = WandbBackend({"mode": "disabled", "dir": str(tmp_path)})
    assert be.open_run(RunSpec(project="default")).project == "from-wandb"  # ct.init() without project=
    assert be.open_run(RunSpec(project="named")).project == "named"  # ct.init(project="named") wins
    configured = WandbBackend({"mode": "disabled", "dir": str(tmp_path), "project": "configured"})
    assert configured.open_run(RunSpec(project="default")).project == "configured"


def test_wandb_project_reaches_the_offline_record_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "from-wandb")
    with ct.init(name="r", settings={"backend": "wandb", "wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}}) \
            as run:
        run.log_checkpoint(1, model=torch.nn.Linear(2, 1), blocking=True).wait()
    log = next((tmp_path / "wb").glob(f"wandb/offline-run-*-{run.id}/run-{run.id}.wandb"))
    assert next(r.run for r in finished_records(log) if r.WhichOneof("record_type") == "run").project == "from-wandb"
    assert (tmp_path / "wb" / "wandb" / "ckpt_track" / "from-wandb" / run.id / "run.json").is_file()


def test_wandb_dir_is_the_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env-dir"))
    assert WandbBackend({"mode": "disabled"}).dir == tmp_path / "env-dir"
    assert WandbBackend({"mode": "disabled", "dir": str(tmp_path / "mine")}).dir == tmp_path / "mine"


# -- server -----------------------------------------------------------------------------------------------
def test_wandb_base_url_is_the_default_server(tmp_path: Path, fake: FakeWandb,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    be = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb")})
    run = be.open_run(RunSpec(project="resnet", run_id=RUN))
    be.finish_run(run)
    assert ("acme", "resnet", RUN) in fake.servers[SELF_HOSTED].runs
    assert dict(run.ref.params) == {"base_url": SELF_HOSTED}  # the ref restores without the variable
    mine = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb"), "base_url": SAAS})  # ckpt_track's wins
    other = mine.open_run(RunSpec(project="resnet", run_id="other"))
    mine.finish_run(other)
    assert ("acme", "resnet", "other") in fake.servers[SAAS].runs
    assert ("acme", "resnet", "other") not in fake.servers[SELF_HOSTED].runs
