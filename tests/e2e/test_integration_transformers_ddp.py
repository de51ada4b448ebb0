"""The Hugging Face Trainer under DDP (2 CPU processes, gloo, started with torchrun): the
world process zero records one version per save, and a Trainer resumed on 2 ranks from a
ckpt_track reference ends with the same weights as the uninterrupted one (every rank gets
the RNG state file the Trainer looks for)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from distributed.launch import free_port
from safetensors.torch import load_file

import ckpt_track as ct

SCRIPT = Path(__file__).with_name("hf_ddp.py")


def _torchrun(cwd: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), OMP_NUM_THREADS="1", COMET_DISABLE_AUTO_LOGGING="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(SCRIPT), str(cwd / "store"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_ddp_trainer_resumes_identically(tmp_path: Path) -> None:
    _torchrun(tmp_path, "straight", "8", str(tmp_path / "straight.safetensors"))
    ref = f"local://hf-ddp/straight@step=4?root={tmp_path / 'store'}"
    _torchrun(tmp_path, "resumed", "8", str(tmp_path / "resumed.safetensors"), ref)
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stored = ct.list_checkpoints(f"local://hf-ddp/straight?root={tmp_path / 'store'}")
    assert [s.step for s in stored] == [4, 8]  # one version per save, not one per rank
