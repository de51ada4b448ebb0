"""What W&B's UI shows for checkpoints, read back from what the real SDK wrote offline (the
``.wandb`` record log ``wandb sync`` uploads): each artifact version's step, metrics, aliases,
description with the exact restore command; the run config; the run summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fakes.wandb import finished_records

import ckpt_track as ct
from ckpt_track.refs import restore_commands
from tests.backends import test_backend_wandb as _wandb

_wandb_service, wandb_env = _wandb._wandb_service, _wandb.wandb_env  # W&B dirs under tmp_path


def _records(tmp_path: Path, run_id: str) -> list[Any]:
    log = next((tmp_path / "wb").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    return finished_records(log)


def test_artifact_config_and_summary_carry_step_metrics_aliases_and_restore_command(tmp_path: Path) -> None:
    settings = {"backend": "wandb", "wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}}
    model = torch.nn.Linear(2, 1)
    with ct.init(project="resnet", name="native", config={"lr": 0.01, "depth": 18}, settings=settings,
                 monitor="val/loss") as run:
        for step, loss in ((10, 0.5), (20, 0.7)):
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, blocking=True).wait()
    records = _records(tmp_path, run.id)
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert len(arts) == 2
    for a, (step, loss) in zip(arts, ((10, 0.5), (20, 0.7))):
        ref = str(run.ref.select(step=step))
        meta = json.loads(a.metadata)
        assert (meta["step"], meta["metrics"], meta["ref"]) == (step, {"val/loss": loss}, ref)
        assert meta["restore"] == dict(zip(("cli", "python"), restore_commands(ref)))
        assert f"step {step}" in a.description and f"val/loss={loss:g}" in a.description
        assert meta["restore"]["cli"] in a.description and meta["restore"]["python"] in a.description
        assert f"step-{step}" in a.description  # the aliases, also as W&B's own
        assert {"latest", f"step-{step}"} <= set(a.aliases)
    assert "best" in arts[0].aliases and "best" not in arts[1].aliases
    config = {u.key: json.loads(u.value_json) for r in records for u in (
        r.run.config.update if r.WhichOneof("record_type") == "run" else
        r.config.update if r.WhichOneof("record_type") == "config" else ())}
    assert (config["lr"], config["depth"]) == (0.01, 18)  # the run config
    summary = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    latest, best = str(run.ref.select(step=20)), str(run.ref.select(step=10))
    assert summary["ckpt_track/latest_step"] == 20 and summary["ckpt_track/latest"] == latest
    assert summary["ckpt_track/latest_restore"] == restore_commands(latest)[0]
    assert summary["ckpt_track/best_step"] == 10 and summary["ckpt_track/best"] == best
    # the command works as printed
    fresh = torch.nn.Linear(2, 1)
    assert ct.restore(best, model=fresh, settings=ct.load_settings(settings)).step == 10
