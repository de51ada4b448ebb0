"""A small real training loop used by the resume tests.

Dropout, a shuffled DataLoader with a seeded generator, AdamW and a LR
scheduler: everything that makes a naive resume diverge.  Usage:

    python train_small.py --steps 40 --out final.safetensors [--stop-after 17] [--every 5]

With ``--stop-after K`` it checkpoints at step K and exits as if it had crashed;
run again without it and the same ``CKPT_TRACK_RUN_NAME`` to resume.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import ckpt_track as ct


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 10), torch.randint(0, 3, (96,)))
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=args.steps)
    gen = torch.Generator()
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=gen)
    batches_per_epoch = len(loader)

    run = ct.init(project="resume-test", name=os.environ.get("RUN_NAME", "small"), config=vars(args))
    start = run.resume(model=model, optimizer=opt, scheduler=sched, rng=os.environ.get("RESUME_RNG", "1") == "1")
    step = start
    while step < args.steps:
        epoch = step // batches_per_epoch
        gen.manual_seed(1234 + epoch)  # data order is a function of the epoch, like set_epoch()
        it = iter(loader)
        for _ in range(step % batches_per_epoch):  # resumed mid-epoch: skip what was seen
            next(it)
        for x, y in it:
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % args.every == 0 or step == args.stop_after:
                run.log_checkpoint(step, epoch=epoch, model=model, optimizer=opt, scheduler=sched,
                                   metrics={"train/loss": loss.item()})
            if step == args.stop_after:
                run.finish()
                print(f"stopped after step {step}", flush=True)
                return 3
            step += 1
            if step >= args.steps:
                break
    run.finish()
    tensors = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    save_file(tensors, args.out)
    print(f"done at step {step}, start was {start}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
