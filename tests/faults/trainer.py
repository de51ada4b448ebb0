"""The trainer the kill tests SIGKILL: resumes its run, checkpoints every step (a few MB, so
kills land inside saves and uploads), and at the end writes its final weights.

    python tests/faults/trainer.py --steps 30 --out final.safetensors   # backend from CKPT_TRACK_*
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import ckpt_track as ct  # noqa: E402
from faults.common import seed_all, train_step  # noqa: E402


def make(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    seed_all()
    model, opt, sched = make(args.width)
    run = ct.init(project="kills", name=os.environ.get("RUN_NAME", "k"))
    start = run.resume(model=model, optimizer=opt, scheduler=sched)
    print(f"ready {start}", flush=True)
    for step in range(start, args.steps):
        train_step(model, opt, sched)
        run.log_checkpoint(step, model=model, optimizer=opt, scheduler=sched, metrics={"val/loss": 1.0 / (step + 1)})
        print(f"logged {step}", flush=True)
    run.finish()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"done {start}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
