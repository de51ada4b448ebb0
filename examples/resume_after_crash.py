"""Resume after a crash: kill this script at any moment, start the same command again,
and it continues from its latest checkpoint, ending bit-identical to a run that was
never interrupted.

    python examples/resume_after_crash.py --steps 40 --out final.safetensors
    # Ctrl-C / kill -9 it, then run the very same command again

Dropout, a shuffled DataLoader, AdamW and a LR schedule: everything that makes a
naive resume diverge.  ckpt_track restores weights, optimizer, scheduler and every
RNG; the loop's part is the data order: seed the loader per epoch and skip the
batches already seen.  The run is found again by its name (``RUN_NAME``, default
"small") with ``resume="auto"``; any backend works (``CKPT_TRACK_BACKEND``).
``--stop-after K`` stops cleanly after step K (used by the tests).
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

    run = ct.init(project="resume-test", name=os.environ.get("RUN_NAME", "small"), config=vars(args), resume="auto")
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
            print(f"step {step}", flush=True)
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
