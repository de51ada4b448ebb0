"""What a crashed process leaves in the spool is recovered in step order, exactly once, and
cleaned up; ``latest`` always means the highest step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import ckpt_track as ct
from ckpt_track.format import write_checkpoint
from ckpt_track.state import capture


def _model(v: float) -> torch.nn.Linear:
    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.fill_(v)
    return m


def _orphan(spool: Path, prefix: str, step: int, value: float) -> Path:
    """A committed spool checkpoint without its sidecar: the disk filled while it was written."""
    c = capture(step=step, model=_model(value))
    ckpt = write_checkpoint(spool, f"{prefix}step{step}-0000abcd", {k: v.contiguous() for k, v in c.tensors.items()},
                            c.tree, step=step, blobs=True)
    return ckpt.path


def test_a_recovered_older_checkpoint_never_takes_latest(tmp_path: Path) -> None:
    run = ct.init(project="p", name="orphan", monitor=None)
    spool = Path("ckpt_runs/.spool").absolute()
    orphan = _orphan(spool, f"p-{run.id}-", 2, 2.0)
    for step in (3, 4, 5):
        run.log_checkpoint(step, model=_model(float(step))).wait()
    run.finish()  # (the orphan was created after this run's recovery: it is left for the next one)
    again = ct.init(project="p", name="orphan", monitor=None)
    fresh = _model(0.0)
    assert again.resume(model=fresh) == 6  # not 3: the recovered step 2 is older
    assert torch.equal(fresh.weight, _model(5.0).weight)
    again.finish()
    listed = ct.list_checkpoints(run.ref)
    assert sorted(s.step for s in listed) == [2, 3, 4, 5]  # nothing lost, nothing twice
    assert "latest" in next(s for s in listed if s.step == 5).aliases
    assert "latest" not in next(s for s in listed if s.step == 2).aliases
    assert not orphan.exists() and not list(spool.iterdir())


def _dies_after_one_checkpoint(tmp_path: Path, name: str) -> str:
    """A process that stores step 1 and dies without finish(); returns its run id."""
    code = ("import os, torch, ckpt_track as ct\n"
            f"run = ct.init(project='p', name={name!r}, monitor=None)\n"
            "run.log_checkpoint(1, model=torch.nn.Linear(4, 4)).wait()\n"
            "print(run.id, flush=True)\n"
            "os._exit(0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.split()[-1]


def test_a_stored_checkpoint_whose_sidecar_was_not_updated_is_not_stored_twice(tmp_path: Path) -> None:
    """Killed after the store committed the version but before the spool noted it: the next
    process recognises the checkpoint (same step and creation time) and completes it."""
    run_id = _dies_after_one_checkpoint(tmp_path, "twice")
    (kept,) = [p for p in Path("ckpt_runs/.spool").iterdir() if p.is_dir()]
    # what a kill at that moment leaves: the sidecar still owes "local" and there is no .kept marker
    kept.with_name(kept.name + ".kept").unlink(missing_ok=True)
    kept.with_name(kept.name + ".pending.json").write_text(json.dumps({"aliases": [], "backends": ["local"]}))
    again = ct.init(project="p", name="twice", monitor=None)
    assert again.id == run_id
    again.finish()
    assert [s.step for s in ct.list_checkpoints(again.ref)] == [1]
    assert not list(Path("ckpt_runs/.spool").iterdir())


def test_leftovers_of_dead_processes_are_removed_and_nothing_remains_after_finish(tmp_path: Path) -> None:
    run_id = _dies_after_one_checkpoint(tmp_path, "junk")
    spool = Path("ckpt_runs/.spool")
    prefix = f"p-{run_id}-"
    # a half-written save, a half-removed one, a sidecar write cut short, a stale marker,
    # a copy into the store cut short
    (spool / f".tmp-{prefix}step2-00000000-11111111").mkdir()
    (spool / f".tmp-{prefix}step2-00000000-11111111" / "t-x.safetensors").write_bytes(b"x" * 100)
    (spool / f"{prefix}step9-22222222.pending.json.33333333.tmp").write_text("{")
    (spool / f"{prefix}step8-44444444.kept").touch()
    incoming = next(Path("ckpt_runs/p").glob("*/checkpoints")) / ".incoming" / "999999999-deadbeef"
    incoming.mkdir(parents=True)
    again = ct.init(project="p", name="junk", monitor=None)
    again.log_checkpoint(2, model=_model(2.0)).wait()
    again.finish()
    assert not incoming.exists()
    assert not list(spool.iterdir()), sorted(p.name for p in spool.iterdir())
    assert [s.step for s in ct.list_checkpoints(again.ref)] == [1, 2]
