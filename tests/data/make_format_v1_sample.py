"""Generate the checkpoint format v1 sample kept in ``tests/data/format_v1/`` forever.

The sample is committed and must never be regenerated as part of the test
suite: ``tests/test_format_compat.py`` loads it to prove that checkpoints
written by this version of ckpt_track keep loading in later versions.  Run this
script only when deliberately creating a *new* sample (e.g. for a format v2,
into a new directory); it refuses to overwrite an existing sample unless
``--force`` is given.

    python tests/data/make_format_v1_sample.py [--out DIR] [--force]

Writes ``DIR/sample/`` (the checkpoint) and ``DIR/expected.json`` (dtype, shape
and sum of every tensor, plus step/epoch/metrics and a few restored values),
computed at generation time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_track.format import FORMAT_VERSION, write_checkpoint
from ckpt_track.state import capture
from ckpt_track.writer import snapshot_tensors

DEFAULT_OUT = Path(__file__).resolve().parent / "format_v1"
NAME = "sample"
EXPECTED = "expected.json"

STEP = 7
EPOCH = 1
METRICS = {"val/loss": 0.5}
NOTE = "format v1 sample"
TOKENS_SEEN = 1234
IDS = [3, 1, 4, 1, 5, 9, 2, 6]


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """The architecture of the sample (tests/test_format_compat.py builds the same one)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def describe(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sum": float(t.double().sum())}


def generate(out: Path, *, force: bool = False) -> Path:
    target, expected_path = out / NAME, out / EXPECTED
    existing = [p for p in (target, expected_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); the format v1 sample is kept forever and "
            "must not be regenerated (pass --force only if you really mean to replace it)"
        )
    if target.exists():
        shutil.rmtree(target)
    expected_path.unlink(missing_ok=True)

    torch.manual_seed(0)
    model, opt, sched = build()
    train(model, opt, sched)
    extra = {"note": NOTE, "tokens_seen": TOKENS_SEEN, "ids": torch.tensor(IDS, dtype=torch.int64)}
    captured = capture(step=STEP, epoch=EPOCH, model=model, optimizer=opt, scheduler=sched, extra=extra, rng=False)
    tensors = snapshot_tensors(captured.tensors, copy=True)
    write_checkpoint(out, NAME, tensors, captured.tree, step=STEP, epoch=EPOCH, metrics=METRICS)

    expected = {
        "format_version": FORMAT_VERSION,
        "generated_with_torch": torch.__version__.split("+")[0],
        "step": STEP,
        "epoch": EPOCH,
        "metrics": METRICS,
        "extra": {"note": NOTE, "tokens_seen": TOKENS_SEEN, "ids": IDS},
        "last_lr": sched.get_last_lr(),
        "optimizer_steps": 2,
        "tensors": {name: describe(t) for name, t in sorted(tensors.items())},
    }
    expected_path.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="replace an existing sample")
    args = parser.parse_args(argv)
    try:
        target = generate(args.out, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    files = sorted(p for p in target.parent.rglob("*") if p.is_file() and p.suffix != ".py")
    for p in files:
        print(f"{p.stat().st_size:8d}  {p.relative_to(target.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
