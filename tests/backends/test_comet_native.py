"""What Comet's UI shows for checkpoints, read back from the real SDK's offline archive (what
``comet upload`` sends): each model's metadata with step, metrics, aliases and the exact restore
command; the experiment others (newest and best checkpoint, how to restore them); the run
config as experiment parameters; the experiment tag."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

import ckpt_track as ct
from ckpt_track.backends.comet import model_name
from ckpt_track.refs import restore_commands
from tests.backends import test_backend_comet as _comet
from tests.fakes.comet import FakeComet

fake_server, comet_env = _comet.fake_server, _comet.comet_env  # the fixtures of the backend's tests


def _messages(archive: Path) -> list[dict[str, Any]]:
    with zipfile.ZipFile(archive) as z:
        return [json.loads(line) for line in z.read("messages.json").splitlines() if line.strip()]


def test_models_others_and_parameters_carry_step_metrics_aliases_and_restore_command(
        comet_env: FakeComet, tmp_path: Path) -> None:
    settings = {"backend": "comet", "comet": {"workspace": "ws", "online": False,
                                              "offline_directory": str(tmp_path / "off")}}
    model = torch.nn.Linear(2, 1)
    with ct.init(project="native", name="n", config={"lr": 0.01, "depth": 18}, settings=settings,
                 monitor="val/loss") as run:
        stored = [run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, blocking=True).wait()
                  for step, loss in ((10, 0.5), (20, 0.7))]
    messages = _messages(tmp_path / "off" / f"{run.info.native.key}.zip")
    elements = [m["payload"] for m in messages
                if m["type"] == "file_upload" and m["payload"]["upload_type"] == "model-element"]
    for s, loss in zip(stored, (0.5, 0.7)):
        ref = str(run.ref.select(step=s.step))
        metas = [p["metadata"] for p in elements if p["additional_params"]["groupingName"] == model_name(s.version,
                                                                                                           s.step)]
        assert metas and all(m == metas[0] for m in metas)
        meta = metas[0]
        assert (meta["step"], meta["metrics"], meta["ref"]) == (s.step, {"val/loss": loss}, ref)
        assert {"latest", f"step-{s.step}"} <= set(meta["aliases"])
        assert meta["restore"] == dict(zip(("cli", "python"), restore_commands(ref)))
    others: dict[str, Any] = {}
    for m in messages:
        if m["type"] == "log_other":
            others[m["payload"]["key"]] = m["payload"]["value"]
    latest, best = str(run.ref.select(step=20)), str(run.ref.select(step=10))
    assert others["ckpt_track.latest_step"] == 20 and others["ckpt_track.latest"] == latest
    assert others["ckpt_track.latest_restore"] == restore_commands(latest)[0]
    assert others["ckpt_track.best_step"] == 10 and others["ckpt_track.best"] == best
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
              for m in messages if m["type"] == "parameter_msg"}
    assert (str(params["lr"]), str(params["depth"])) == ("0.01", "18")
    with zipfile.ZipFile(tmp_path / "off" / f"{run.info.native.key}.zip") as z:
        assert "ckpt_track" in json.loads(z.read("experiment.json"))["tags"]
    fresh = torch.nn.Linear(2, 1)  # the command works as printed
    assert ct.restore(best, model=fresh, settings=ct.load_settings(settings)).step == 10
