"""Resume is bit-identical: interrupted-and-resumed training ends with the same
weights and optimizer state as uninterrupted training, across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parents[2] / "examples" / "resume_after_crash.py"


def _train(tmp_path: Path, run_name: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(RUN_NAME=run_name, CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "store"), PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, str(SCRIPT), "--steps", "40", "--out", out, *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [17, 23])  # mid-epoch (6 batches per epoch) and at a checkpoint boundary+3
def test_resume_in_new_process_is_bit_identical(tmp_path: Path, stop_after: int) -> None:
    full = _train(tmp_path, "uninterrupted", "full.safetensors")
    assert full.returncode == 0, full.stderr
    first = _train(tmp_path, "interrupted", "never.safetensors", "--stop-after", str(stop_after))
    assert first.returncode == 3, first.stderr
    assert not (tmp_path / "never.safetensors").exists()
    second = _train(tmp_path, "interrupted", "resumed.safetensors")
    assert second.returncode == 0, second.stderr
    assert f"start was {stop_after + 1}" in second.stdout

    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_without_rng_state_diverges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: it does detect a resume that misses part of the state."""
    full = _train(tmp_path, "uninterrupted", "full.safetensors")
    assert full.returncode == 0, full.stderr
    assert _train(tmp_path, "interrupted", "never.safetensors", "--stop-after", "17").returncode == 3
    monkeypatch.setenv("RESUME_RNG", "0")
    second = _train(tmp_path, "interrupted", "resumed.safetensors")
    assert second.returncode == 0, second.stderr
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)
