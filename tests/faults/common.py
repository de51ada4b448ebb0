"""Shared pieces of the fault-injection suite: a small deterministic training loop that uses
every global random generator, and the long-suite switch."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: ``CKPT_TRACK_FAULTS_LONG=1`` runs the long version of every fault test (the figures in the
#: README's guarantees section); CI runs the short one.
LONG = os.environ.get("CKPT_TRACK_FAULTS_LONG", "") not in ("", "0")


#: The slowest a ``log_checkpoint`` call may be in the fault tests: below the 1.5 s delays the
#: proxy injects, so any wait on the tracker fails the test.  The measured figure is recorded in
#: tests/artifacts/faults/ (the README quotes the long suite's).
LOOP_LIMIT = 1.0


def scale(short: int, long: int) -> int:
    return long if LONG else short


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    """One step whose result depends on Python's, NumPy's and torch's global generators."""
    n = 8 + int(random.random() * 8)  # Python's generator picks the batch size
    x = torch.randn(n, 16) + torch.from_numpy(np.random.standard_normal((n, 16)).astype("float32"))
    y = torch.randint(0, 4, (n,))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)  # dropout: torch's generator
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def rng_state() -> tuple[Any, ...]:
    return random.getstate(), repr(np.random.get_state()), torch.get_rng_state().clone()



@dataclass
class Loop:
    """Train ``steps`` steps, checkpointing every ``every``; record how long each call blocked."""

    stalls: list[float] = field(default_factory=list)

    def run(self, run: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, start: int, steps: int,
            every: int = 1, pause: float = 0.0, between: Callable[[int], None] | None = None) -> None:
        for step in range(start, steps):
            train_step(model, opt, sched)
            if step % every == 0:
                t0 = time.perf_counter()
                run.log_checkpoint(step, model=model, optimizer=opt, scheduler=sched,
                                   metrics={"val/loss": 1.0 / (step + 1)})
                self.stalls.append(time.perf_counter() - t0)
            if between is not None:
                between(step)
            if pause:
                time.sleep(pause)


def baseline(steps: int) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` uninterrupted steps, without ckpt_track."""
    seed_all()
    model, opt, sched = make()
    for _ in range(steps):
        train_step(model, opt, sched)
    return {k: v.clone() for k, v in model.state_dict().items()}


def equal_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
