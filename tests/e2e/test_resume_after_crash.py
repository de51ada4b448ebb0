"""SIGKILL the example at a random step, start the same command again: it ends bit-identical
to a run that was never interrupted (local and MLflow backends)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).parents[2] / "examples" / "resume_after_crash.py"
STEPS = 40


def _env(tmp_path: Path, backend: str, uri: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_BACKEND=backend, CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "store"))
    if uri:
        env["CKPT_TRACK_MLFLOW__TRACKING_URI"] = uri
    return env


def _cmd(out: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--every", "3", "--out", out]


@pytest.mark.parametrize("backend", ["local", "mlflow"])
def test_sigkill_at_a_random_step_then_restart_is_bit_identical(tmp_path: Path, backend: str, request) -> None:
    uri = request.getfixturevalue("mlflow_env").uri if backend == "mlflow" else None
    env = _env(tmp_path, backend, uri)
    full = subprocess.run(_cmd("full.safetensors"), cwd=tmp_path, env={**env, "RUN_NAME": "whole"},
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    kill_at = random.Random(f"{backend}-crash").randint(7, STEPS - 8)  # seeded: reproducible, not hand-picked
    proc = subprocess.Popen(_cmd("crashed.safetensors"), cwd=tmp_path, env={**env, "RUN_NAME": "crashy"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == f"step {kill_at}":
            proc.send_signal(signal.SIGKILL)  # mid-training, possibly mid-save
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "crashed.safetensors").exists()

    again = subprocess.run(_cmd("crashed.safetensors"), cwd=tmp_path, env={**env, "RUN_NAME": "crashy"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    start = int(again.stdout.rsplit("start was ", 1)[1].split()[0])
    assert 0 < start <= kill_at + 1  # it really resumed, from a checkpoint at or before the kill

    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "crashed.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    spool = tmp_path / "store" / ".spool"
    assert not spool.exists() or not any(p.name.endswith(".pending.json") for p in spool.iterdir())
