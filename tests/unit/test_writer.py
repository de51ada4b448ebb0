"""Background saving semantics: returns before writing, snapshots are isolated, staging
buffers are reused, back-pressure bounds what is in flight."""

from __future__ import annotations

import threading

import pytest
import torch

import ckpt_track as ct
from ckpt_track.backends.local import LocalBackend


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch):
    """LocalBackend.put waits until the test opens the gate."""
    gate = threading.Event()
    entered = threading.Event()
    real_put = LocalBackend.put

    def put(self, run, ckpt, aliases=()):
        entered.set()
        assert gate.wait(60), "test never opened the gate"
        return real_put(self, run, ckpt, aliases)

    monkeypatch.setattr(LocalBackend, "put", put)
    yield gate, entered
    gate.set()


def test_returns_before_the_checkpoint_is_written(gated) -> None:
    gate, entered = gated
    model = torch.nn.Linear(64, 64)
    run = ct.init(project="p")
    handle = run.log_checkpoint(1, model=model)
    assert entered.wait(60)
    assert not handle.done() and ct.list_checkpoints(run.ref) == []
    gate.set()
    assert handle.wait().step == 1
    run.finish()


def test_snapshot_is_isolated_from_later_training(gated) -> None:
    gate, entered = gated
    model = torch.nn.Linear(8, 8)
    before = model.weight.detach().clone()
    run = ct.init(project="p")
    run.log_checkpoint(1, model=model)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the save is still pending
    gate.set()
    run.finish()
    fresh = torch.nn.Linear(8, 8)
    ct.restore(run.ref, model=fresh)
    assert torch.equal(fresh.weight, before)


@pytest.fixture
def gated_write(monkeypatch: pytest.MonkeyPatch):
    """Writing a checkpoint to the spool (the disk part of a save) waits for the test's gate."""
    import ckpt_track.checkpointing as save_module  # where Run's commit to the spool writes

    gate = threading.Event()
    entered = threading.Event()
    real = save_module.write_checkpoint

    def write(*args, **kwargs):
        entered.set()
        assert gate.wait(60), "test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(save_module, "write_checkpoint", write)
    yield gate, entered
    gate.set()


def test_back_pressure_waits_for_a_free_slot(gated_write) -> None:
    gate, entered = gated_write
    run = ct.init(project="p", settings={"max_in_flight": 1})
    run.log_checkpoint(1, model=torch.nn.Linear(4, 4))
    assert entered.wait(60)
    second = threading.Thread(target=run.log_checkpoint, args=(2,), kwargs={"model": torch.nn.Linear(4, 4)})
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked: one save is already being written
    gate.set()
    second.join(60)
    assert not second.is_alive()
    run.finish()
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1, 2]


def test_a_hanging_tracker_never_blocks_the_loop(gated) -> None:
    """Uploads run behind the save: with the tracker stuck inside put, further saves still
    return at once (max_in_flight=1 bounds the disk writes only)."""
    gate, entered = gated
    run = ct.init(project="p", settings={"max_in_flight": 1})
    run.log_checkpoint(1, model=torch.nn.Linear(4, 4))
    assert entered.wait(60)  # the upload of step 1 hangs in the tracker
    done = threading.Event()
    saver = threading.Thread(target=lambda: ([run.log_checkpoint(s, model=torch.nn.Linear(4, 4)) for s in (2, 3, 4)],
                                             done.set()))
    saver.start()
    assert done.wait(30), "log_checkpoint waited on the tracker"
    gate.set()
    run.finish()
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1, 2, 3, 4]


def test_staging_buffers_are_reused_between_saves() -> None:
    model = torch.nn.Linear(32, 32)
    with ct.init(project="p") as run:
        run.log_checkpoint(1, model=model).wait()
        (buffers,) = run._writer._staging
        first = {k: v.data_ptr() for k, v in buffers.items()}
        with torch.no_grad():
            model.weight.mul_(2)
        run.log_checkpoint(2, model=model).wait()
        (buffers,) = run._writer._staging
        assert {k: v.data_ptr() for k, v in buffers.items()} == first  # same memory, no new allocation
    fresh = torch.nn.Linear(32, 32)
    ct.restore(f"{run.ref}@step=2", model=fresh)
    assert torch.equal(fresh.weight, model.weight)
    ct.restore(f"{run.ref}@step=1", model=fresh)
    assert torch.equal(fresh.weight, model.weight / 2)
