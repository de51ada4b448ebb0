"""A repeated or decreasing step is stored as asked, with a StepOrderWarning; ``@step=N``
selects the newest version at that step."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch

import ckpt_track as ct


@pytest.fixture()
def settings(tmp_path: Path) -> dict:
    return {"local": {"root": str(tmp_path / "store")}}


def _log(run: ct.Run, step: int, value: float) -> list[warnings.WarningMessage]:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log_checkpoint(step, model=model, blocking=True)
    return [w for w in caught if issubclass(w.category, ct.StepOrderWarning)]


def test_repeated_and_decreasing_steps_warn_and_are_kept(settings: dict) -> None:
    run = ct.init(project="p", name="steps", settings=settings)
    assert _log(run, 1, 1.0) == []
    assert _log(run, 2, 2.0) == []
    repeated = _log(run, 2, 3.0)
    assert len(repeated) == 1 and "step 2 was already logged" in str(repeated[0].message)
    assert repeated[0].filename == __file__  # points at the caller's line
    lower = _log(run, 1, 4.0)
    assert len(lower) == 1 and "step 1 is below step 2" in str(lower[0].message)
    assert _log(run, 3, 5.0) == []
    run.finish()

    steps = [s.step for s in ct.list_checkpoints(str(run.ref), settings=ct.load_settings(overrides=settings))]
    assert steps == [1, 2, 2, 1, 3]
    model = torch.nn.Linear(2, 2)
    ct.restore(f"{run.ref}@step=2", model=model, settings=ct.load_settings(overrides=settings))
    assert torch.all(model.weight == 3.0)  # the newest version at step 2


def test_a_resumed_run_warns_on_a_step_it_already_holds(settings: dict) -> None:
    run = ct.init(project="p", name="again", settings=settings)
    _log(run, 5, 1.0)
    run.finish()
    again = ct.init(project="p", name="again", settings=settings)
    assert again.resumed
    found = _log(again, 0, 2.0)  # restarted from 0 without run.resume()
    assert len(found) == 1 and "below step 5" in str(found[0].message)
    assert _log(again, 6, 3.0) == []
    again.finish()


def test_init_signature_shows_no_object_repr() -> None:
    shown = str(inspect.signature(ct.init))
    assert "object at 0x" not in shown and "monitor: 'str | None' = <from settings>" in shown


def test_a_failed_call_does_not_count_as_logged(settings: dict) -> None:
    run = ct.init(project="p", name="retry", settings=settings)
    with pytest.raises(ct.SerializationError):
        run.log_checkpoint(4, model=torch.nn.Linear(2, 2), extra={"bad": object()}, blocking=True)
    assert _log(run, 4, 1.0) == []  # the retry of a step that was never stored: no warning
    run.finish()
