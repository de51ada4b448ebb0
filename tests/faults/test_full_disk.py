"""A disk that fills up (a real, small tmpfs): every write failure is a CheckpointWriteError that
names the directory and the free space, earlier checkpoints stay intact, and once space is
freed the next save succeeds and nothing committed is lost."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import ckpt_track as ct
from ckpt_track.errors import CheckpointWriteError
from faults.common import scale

MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); CI runs as root, where it works")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Grow a filler file until ``leave`` bytes are free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
    return filler


def test_full_disk_at_every_point_of_a_save(small_disk: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # a checkpoint of about 260 kB
    run = ct.init(project="disk", name="full", monitor=None,  # retention keeps the store within the disk
                  settings={"local": {"root": str(small_disk / "store")}, "retention": {"keep_last": 2}})
    step = 0
    assert run.log_checkpoint(step, model=model).wait() is not None
    good = [step]
    failures = 0
    spots = scale(12, 60)
    for i in range(spots):
        leave = int(i * 340_000 / spots)  # from nothing free to just enough: each part of a save in turn
        filler = _fill(small_disk, leave)
        with torch.no_grad():
            model.weight.add_(1.0)  # every save has new bytes to write
        step += 1
        try:
            assert run.log_checkpoint(step, model=model).wait() is not None  # stored
            good.append(step)
        except CheckpointWriteError as exc:
            failures += 1
            msg = str(exc)
            assert str(small_disk) in msg and "free" in msg, msg  # names the directory and the space
            assert "\n" not in msg.split(":", 1)[0]
        filler.unlink()
        with torch.no_grad():
            model.weight.add_(1.0)
        step += 1
        assert run.log_checkpoint(step, model=model).wait() is not None  # space freed: the next save succeeds
        good.append(step)
    run.finish()
    assert failures >= 2, "the disk never filled: the test did not exercise anything"
    listed = ct.list_checkpoints(run.ref.with_params({"root": str(small_disk / "store")}))
    assert [s.step for s in listed] == good[-2:]  # retention kept the newest two; nothing else went missing
    for s in listed:  # every stored checkpoint is intact
        ct.restore(s.ref.with_params({"root": str(small_disk / "store")}), model=torch.nn.Linear(256, 256))
    spool = small_disk / "store" / ".spool"
    assert not [p.name for p in spool.iterdir()], "spool leftovers"
