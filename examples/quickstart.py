"""ckpt_track quickstart: log checkpoints while training, restore the best one.

Runs on the CPU in a few seconds with the embedded local backend (no server):

    python examples/quickstart.py

Run it twice: the second time it resumes the same run where the first stopped.
Switch tracker without touching this file: CKPT_TRACK_BACKEND=mlflow python examples/quickstart.py
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import ckpt_track as ct

STEPS, EVERY = 200, 25


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x @ torch.randn(16, 1) + 0.1 * torch.randn(512, 1)).squeeze(1)
    x_val, y_val = x[-128:], y[-128:]
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)

    run = ct.init(project="quickstart", name="regression", config={"lr": 3e-3, "steps": STEPS})
    start = run.resume(model=model, optimizer=opt, scheduler=sched)  # 0 on a fresh run
    print(f"run {run.ref} ({'resumed at step ' + str(start) if start else 'new'})")
    for step in range(start, STEPS):
        idx = torch.randint(0, 384, (32,))
        model.train()
        loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % EVERY == 0 or step == STEPS - 1:
            model.eval()
            with torch.no_grad():
                val = torch.nn.functional.mse_loss(model(x_val).squeeze(1), y_val).item()
            run.log_checkpoint(step, model=model, optimizer=opt, scheduler=sched,
                               metrics={"train/loss": loss.item(), "val/loss": val})
            # returns before the save is done: its reference is restorable once handle.wait()
            # (or run.finish()) returned, so report the save, not the reference, here
            print(f"step {step}: val/loss {val:.4f}, saving")
    run.finish()  # waits for the background saves

    table = Table(title=f"checkpoints of {run.ref}")
    for col in ("version", "step", "aliases", "val/loss", "size"):
        table.add_column(col)
    for s in ct.list_checkpoints(run.ref):
        aliases = ", ".join(a for a in s.aliases if not a.startswith("step-"))
        table.add_row(f"v{s.version}", str(s.step), aliases, f"{s.metrics.get('val/loss', float('nan')):.4f}",
                      f"{s.size / 1024:.1f} KiB")
    Console().print(table)

    best_model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    best = ct.restore(f"{run.ref}@best", model=best_model)
    print(f"restored best checkpoint {best.ref}: step {best.step}, val/loss {best.metrics['val/loss']:.4f}")
    print(f"inspect it: ckpt-track ls {run.ref}   |   ckpt-track show {run.ref}@best")


if __name__ == "__main__":
    main()
