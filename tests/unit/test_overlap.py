"""Overlapped snapshots (ckpt_track.overlap): what the optimizer owns is copied in the
background and its step waits; the stored checkpoint always equals the state at the call."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ckpt_track as ct
from ckpt_track.errors import CheckpointWriteError


def make(kind: str = "adamw", bn: bool = True, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, 32)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(32))
    layers += [torch.nn.ReLU(), torch.nn.Linear(32, 1)]
    model = torch.nn.Sequential(*layers)
    first, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    groups = [{"params": first, "lr": 1e-2}, {"params": rest, "lr": 3e-3}]  # two parameter groups
    opt = {
        "adamw": lambda: torch.optim.AdamW(groups, weight_decay=0.1),
        "adam-foreach": lambda: torch.optim.Adam(groups, foreach=True),
        "adam-single": lambda: torch.optim.Adam(groups, foreach=False),
        "sgd": lambda: torch.optim.SGD(groups, momentum=0.9, nesterov=True),
        "rmsprop": lambda: torch.optim.RMSprop(groups, momentum=0.5),
        "adagrad": lambda: torch.optim.Adagrad(groups),
    }[kind]()
    return model, opt


X = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, passes: int = 1) -> None:
    opt.zero_grad()
    for i in range(passes):  # gradient accumulation: several forward/backward, one step
        model(X[i::passes]).square().mean().backward()
    opt.step()


def state_now(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"m/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        out.update({f"o/{i}/{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def restored(ref: str, kind: str, bn: bool = True) -> dict[str, torch.Tensor]:
    model, opt = make(kind, bn, seed=99)
    train_step(model, opt)  # different values everywhere, state allocated
    ct.restore(ref, model=model, optimizer=opt)
    return state_now(model, opt)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hold_copies(run: ct.Run) -> threading.Event:
    """Keep the run's snapshot thread busy until the returned event is set: the deferred copies
    of the next checkpoint cannot start before."""
    release = threading.Event()
    run._gate._copier.submit(release.wait)
    return release


@pytest.mark.parametrize("kind", ["adamw", "adam-foreach", "adam-single", "sgd", "rmsprop", "adagrad"])
def test_snapshot_is_the_state_at_the_call_while_training_goes_on(kind):
    model, opt = make(kind)
    train_step(model, opt)
    run = ct.init(project="p", name=f"r-{kind}", monitor=None)
    want = state_now(model, opt)
    release = hold_copies(run)
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    assert not handle.done()
    model(X)  # forward changes the BatchNorm statistics: they were copied before the call returned
    timer = threading.Timer(0.05, release.set)
    timer.start()
    train_step(model, opt)  # waits in the step pre-hook until the copies are done
    train_step(model, opt)
    handle.wait()
    assert same(restored(f"{run.ref}@step=1", kind), want)
    assert not same(state_now(model, opt), want)  # training did go on
    run.finish()


def test_optimizer_step_waits_for_the_deferred_copies():
    """The copies run while the loop computes: log_checkpoint returns before they are done and
    the step is what waits (without the pre-hook, the step would run at once and change the
    tensors mid-copy)."""
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    want = state_now(model, opt)
    release = hold_copies(run)
    t0 = time.perf_counter()
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    assert time.perf_counter() - t0 < 5
    stepped = threading.Event()

    def step() -> None:
        train_step(model, opt)
        stepped.set()

    worker = threading.Thread(target=step)
    worker.start()
    assert not stepped.wait(0.3), "the optimizer stepped while its tensors were still to be copied"
    release.set()
    worker.join(30)
    assert stepped.is_set()
    handle.wait()
    assert same(restored(f"{run.ref}@step=1", "adamw"), want)
    run.finish()


def test_gradient_accumulation_and_buffers_that_change_in_forward():
    model, opt = make()
    train_step(model, opt, passes=2)
    run = ct.init(project="p", name="r", monitor=None)
    want = state_now(model, opt)
    release = hold_copies(run)
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    opt.zero_grad()
    for i in range(4):  # four forward/backward passes before the step: no wait, no refusal
        model(X[i::4]).square().mean().backward()
    assert not handle.done()
    release.set()
    opt.step()
    handle.wait()
    assert same(restored(f"{run.ref}@step=1", "adamw"), want)
    run.finish()


def test_an_in_place_edit_right_after_the_call_refuses_the_checkpoint():
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    run.log_checkpoint(1, model=model, optimizer=opt).wait()
    release = hold_copies(run)
    handle = run.log_checkpoint(2, model=model, optimizer=opt)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # not the optimizer: nothing waits for the copy
    release.set()
    with pytest.raises(CheckpointWriteError, match=r"refused: tensor 'model/0\.weight' was changed in place") as err:
        handle.wait()
    assert "overlap=False" in str(err.value)
    assert [s.step for s in run.checkpoints()] == [1]  # never stored as a mixture
    # the loop goes on: the next checkpoint is fine
    train_step(model, opt)
    want = state_now(model, opt)
    run.log_checkpoint(3, model=model, optimizer=opt).wait()
    assert same(restored(f"{run.ref}@step=3", "adamw"), want)
    run.finish()


def test_an_edit_of_optimizer_state_is_caught_too():
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    release = hold_copies(run)
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    next(iter(opt.state.values()))["exp_avg"].zero_()
    release.set()
    with pytest.raises(CheckpointWriteError, match=r"optimizer/state/0/exp_avg"):
        handle.wait()
    run.finish()


def test_overlap_false_copies_everything_before_returning():
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None, settings={"overlap": False})
    want = state_now(model, opt)
    release = hold_copies(run)  # nothing of this save waits for the snapshot thread
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # allowed: the copy was made before the call returned
    handle.wait()
    release.set()
    assert same(restored(f"{run.ref}@step=1", "adamw"), want)
    # the keyword overrides the setting, both ways
    handle = run.log_checkpoint(2, model=model, optimizer=opt, overlap=True)
    handle.wait()
    run.finish()


def test_a_restore_in_between_is_not_taken_for_an_edit():
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    run.log_checkpoint(1, model=model, optimizer=opt).wait()
    train_step(model, opt)
    want = state_now(model, opt)
    release = hold_copies(run)
    handle = run.log_checkpoint(2, model=model, optimizer=opt)
    threading.Timer(0.05, release.set).start()
    ct.restore(f"{run.ref}@step=1", model=model, optimizer=opt)  # waits for the copies first
    handle.wait()
    assert same(restored(f"{run.ref}@step=2", "adamw"), want)
    run.finish()


def test_two_saves_in_flight_without_a_step_between():
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None, settings={"max_in_flight": 2})
    want = state_now(model, opt)
    h1 = run.log_checkpoint(1, model=model, optimizer=opt)
    h2 = run.log_checkpoint(2, model=model, optimizer=opt)
    train_step(model, opt)
    h1.wait()
    h2.wait()
    assert same(restored(f"{run.ref}@step=1", "adamw"), want)
    assert same(restored(f"{run.ref}@step=2", "adamw"), want)
    run.finish()


class Wrapper(torch.optim.Optimizer):
    """An optimizer wrapper as Accelerate makes one: it never calls Optimizer.__init__ and
    steps the optimizer it wraps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def state_dict(self):  # type: ignore[override]
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):  # type: ignore[override]
        self.optimizer.load_state_dict(sd)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):  # type: ignore[override]
        return self.optimizer.step(closure)


def test_a_wrapped_optimizer_holds_its_inner_step():
    model, inner = make()
    opt = Wrapper(inner)
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    want = state_now(model, inner)
    release = hold_copies(run)
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    threading.Timer(0.05, release.set).start()
    train_step(model, opt)  # the wrapper's step calls the inner one, whose pre-hook waits
    handle.wait()
    assert same(restored(f"{run.ref}@step=1", "adamw"), want)
    run.finish()


def test_hooks_are_removed_when_the_run_finishes():
    model, opt = make()
    train_step(model, opt)
    before = len(opt._optimizer_step_pre_hooks)
    run = ct.init(project="p", name="r", monitor=None)
    run.log_checkpoint(1, model=model, optimizer=opt)
    run.log_checkpoint(2, model=model, optimizer=opt)
    assert len(opt._optimizer_step_pre_hooks) == before + 1  # one hook per optimizer, not per save
    run.finish()
    assert len(opt._optimizer_step_pre_hooks) == before


def test_an_edit_after_the_copy_and_before_the_step_is_refused_too(monkeypatch):
    """The copy may be complete before the edit, but nothing says so until the step settles it:
    the check at the step refuses the checkpoint (without it, only edits that land while the
    copy runs would be caught)."""
    from ckpt_track import overlap

    stepped = threading.Event()
    real = overlap.Snapshot.before_commit

    def commit_after_the_step(self):  # type: ignore[no-untyped-def]
        stepped.wait(30)  # the writer would otherwise commit (and settle) before the edit
        real(self)

    monkeypatch.setattr(overlap.Snapshot, "before_commit", commit_after_the_step)
    model, opt = make()
    train_step(model, opt)
    run = ct.init(project="p", name="r", monitor=None)
    handle = run.log_checkpoint(1, model=model, optimizer=opt)
    run._gate._copier.submit(lambda: None).result()  # the snapshot thread has done its copies
    with torch.no_grad():
        model[0].weight.add_(1.0)
    train_step(model, opt)
    stepped.set()
    with pytest.raises(CheckpointWriteError, match=r"before the optimizer's next step"):
        handle.wait()
    run.finish()


def test_resume_settles_another_runs_pending_copies():
    model, opt = make()
    train_step(model, opt)
    first = ct.init(project="p", name="a", monitor=None)
    first.log_checkpoint(1, model=model, optimizer=opt).wait()
    train_step(model, opt)
    want = state_now(model, opt)
    other = ct.init(project="p", name="b", monitor=None)
    release = hold_copies(other)
    handle = other.log_checkpoint(2, model=model, optimizer=opt)
    threading.Timer(0.05, release.set).start()
    first.resume(model=model, optimizer=opt)  # writes into the tensors b is still to copy
    handle.wait()
    assert same(restored(f"{other.ref}@step=2", "adamw"), want)
    other.finish()
    first.finish()

