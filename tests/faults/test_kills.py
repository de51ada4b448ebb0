"""SIGKILL the trainer at random moments (it checkpoints every step, so most kills land inside a
save or an upload), restart it each time, and check after the whole sequence: nothing that was
committed is lost, no step is stored twice, every stored version restores, the final weights
are bit-identical to a run that was never killed, and neither the spool nor the tracker keeps
anything behind.  Local store and a real MLflow server."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_track as ct
from ckpt_track.errors import CheckpointNotFound, IntegrityError
from ckpt_track.format import read_manifest
from faults.common import scale

pytestmark = pytest.mark.slow
TRAINER = Path(__file__).with_name("trainer.py")
RESULTS = Path(__file__).parents[1] / "artifacts" / "faults"


def _env(tmp_path: Path, backend: str, uri: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_TRACK_", "MLFLOW_HTTP_REQUEST_"))}
    env.update(CKPT_TRACK_BACKEND=backend, CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "store"), PYTHONHASHSEED="0")
    if uri:
        env["CKPT_TRACK_MLFLOW__TRACKING_URI"] = uri
    return env


def _spooled(store: Path) -> set[int]:
    """Steps committed in the spool (a valid manifest), whatever their upload state."""
    out = set()
    spool = store / ".spool"
    for d in spool.iterdir() if spool.is_dir() else ():
        if d.is_dir() and not d.name.startswith("."):
            try:
                out.add(read_manifest(d).step)
            except (CheckpointNotFound, IntegrityError, OSError):
                pass
    return out


def _run_kills(tmp_path: Path, env: dict[str, str], kills: int, steps: int,
               stored: Callable[[], list[ct.Stored]]) -> dict[str, object]:
    rng = random.Random(f"kills-{env['CKPT_TRACK_BACKEND']}")
    committed: set[int] = set()
    killed = 0
    cmd = [sys.executable, str(TRAINER), "--steps", str(steps), "--out", "crashed.safetensors"]
    for _ in range(kills):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "RUN_NAME": "killed"}, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("ready"), first
        for _ in range(rng.randint(0, 3)):  # a few steps in: inside a save, an upload, or between
            if not proc.stdout.readline():
                break
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        committed |= _spooled(tmp_path / "store") | {s.step for s in stored()}
    again = subprocess.run(cmd, cwd=tmp_path, env={**env, "RUN_NAME": "killed"}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    return {"kills": killed, "committed_before_last_kill": len(committed), "committed": committed}


@pytest.mark.parametrize("backend", ["local", "mlflow"])
def test_random_sigkills_lose_nothing_and_resume_bit_identical(tmp_path: Path, backend: str, request) -> None:
    kills = scale(4, 160) if backend == "local" else scale(2, 40)  # the long suite: 200 kills in all
    steps = 3 * kills + 8
    uri = None
    settings = ct.load_settings({"local": {"root": str(tmp_path / "store")}})
    if backend == "mlflow":
        uri = request.getfixturevalue("mlflow_server").uri
        settings = ct.load_settings({"mlflow": {"tracking_uri": uri}, "local": {"root": str(tmp_path / "store")}})
    env = _env(tmp_path, backend, uri)
    full = subprocess.run([sys.executable, str(TRAINER), "--steps", str(steps), "--out", "full.safetensors"],
                          cwd=tmp_path, env={**env, "RUN_NAME": f"whole-{tmp_path.name}"}, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr

    def run_ref() -> str | None:
        if backend == "local":
            return "local://kills/killed" if (tmp_path / "store" / "kills").is_dir() else None
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("kills")
        runs = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'killed'") if exp else []
        assert len(runs) <= 1, "the restarts created more than one run"
        return f"mlflow://{runs[0].info.run_id}" if runs else None

    def stored() -> list[ct.Stored]:
        ref = run_ref()
        try:
            return ct.list_checkpoints(ref, settings) if ref else []
        except CheckpointNotFound:
            return []

    figures = _run_kills(tmp_path, env, kills, steps, stored)
    committed = figures.pop("committed")
    listed = stored()
    steps_stored = [s.step for s in listed]
    double = len(steps_stored) - len(set(steps_stored))
    lost = sorted(set(committed) - set(steps_stored))  # type: ignore[arg-type]
    corrupt = 0
    for s in listed:
        try:
            ct.restore(s.ref, settings=settings)  # verifies every byte
        except IntegrityError:
            corrupt += 1
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "crashed.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = sorted(p.name for p in (tmp_path / "store" / ".spool").iterdir())  # both runs finished cleanly
    run_dir_junk: list[str] = []
    if backend == "local":
        cdir = next((tmp_path / "store" / "kills").glob("*/checkpoints"))
        run_dir_junk = [p.name for p in cdir.iterdir() if p.name.startswith(".deleting-")]
        run_dir_junk += [p.name for p in (cdir / ".incoming").iterdir()] if (cdir / ".incoming").is_dir() else []
    else:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run_id = listed[0].run.run_id
        exp = client.get_run(run_id).info.experiment_id
        run_dir_junk = [m.model_id for m in client.search_logged_models([exp], filter_string=f"source_run_id='{run_id}'")
                        if not str(m.status).endswith("READY")]
    figures.update(backend=backend, stored=len(listed), lost=len(lost), double_stored=double, corrupt=corrupt,
                   bit_identical=identical, spool_leftovers=len(leftovers), tracker_leftovers=len(run_dir_junk))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"kills_{backend}.json").write_text(json.dumps(figures, indent=1, sort_keys=True))
    assert figures["kills"] == kills
    assert not lost, f"committed checkpoints lost: steps {lost}"
    assert double == 0, f"steps stored twice: {sorted(steps_stored)}"
    assert corrupt == 0
    assert identical, "the killed-and-resumed run ended with other weights"
    assert not leftovers, f"spool leftovers: {leftovers}"
    assert not run_dir_junk, f"leftovers in the store or tracker: {run_dir_junk}"
