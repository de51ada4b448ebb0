"""One training script, any tracker: nothing here names a backend.

    python examples/switch_backend.py                          # local store (default)
    CKPT_TRACK_BACKEND=mlflow CKPT_TRACK_MLFLOW__TRACKING_URI=http://127.0.0.1:5000 python examples/switch_backend.py
    CKPT_TRACK_BACKEND=wandb  CKPT_TRACK_WANDB__MODE=offline    python examples/switch_backend.py
    CKPT_TRACK_BACKEND=clearml CKPT_TRACK_CLEARML__OFFLINE=true python examples/switch_backend.py
    CKPT_TRACK_BACKEND=comet  CKPT_TRACK_COMET__ONLINE=false    python examples/switch_backend.py

or put the same keys in ckpt_track.toml.  Prints one JSON line per checkpoint (step,
metrics, reference) so the output of every backend can be compared; each line is printed
once the tracker holds that checkpoint (``handle.wait()``), so its reference restores.
"""

from __future__ import annotations

import json

import torch

import ckpt_track as ct

STEPS, EVERY = 12, 4


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with ct.init(project="switch", name="switch-demo", config={"lr": 0.05, "steps": STEPS}) as run:
        for step in range(1, STEPS + 1):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % EVERY == 0:
                metrics = {"train/loss": round(loss.item(), 6), "val/loss": round(loss.item() * 1.1, 6)}
                handle = run.log_checkpoint(step, model=model, optimizer=opt, metrics=metrics)
                # log_checkpoint returns before the save is done: the reference names a
                # restorable checkpoint only once wait() returned (a real loop would not wait)
                stored = handle.wait()
                print(json.dumps({"backend": run.ref.backend, "step": step, "metrics": metrics,
                                  "ref": str(handle.ref) if stored is not None else None}), flush=True)


if __name__ == "__main__":
    main()
