"""Lightning with ``strategy="ddp"`` on 2 CPU processes: the callback records one version per
epoch (rank zero records the checkpoint Lightning gathers; it does not wait for the other
ranks to call ct.init), and a new fit resumed from a reference ends identical to an
uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import ckpt_track as ct

SCRIPT = Path(__file__).with_name("lightning_ddp.py")


def _fit(cwd: Path, name: str, epochs: int, out: str, ref: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_TRACK_", "PL_"))}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), str(cwd / "store"), name, str(epochs), str(cwd / out)]
    done = subprocess.run([*args, *([ref] if ref else [])], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_ddp_fit_resumes_identically(tmp_path: Path) -> None:
    output = _fit(tmp_path, "straight", 4, "straight.safetensors")
    _fit(tmp_path, "resumed", 2, "half.safetensors")
    _fit(tmp_path, "resumed", 4, "resumed.safetensors", f"local://lit-ddp/resumed?root={tmp_path / 'store'}")
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    versions = ct.list_checkpoints(f"local://lit-ddp/resumed?root={tmp_path / 'store'}")
    assert [v.step for v in versions] == [4, 8, 12, 16]  # one version per epoch, not one per rank
    assert "no other rank called ct.init" not in output  # rank zero did not wait for the other ranks
