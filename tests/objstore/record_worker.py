"""Log three checkpoints with ``[storage] url`` set (backend from CKPT_TRACK_*), then restore
each by step into a fresh model; prints one JSON line with what it saw."""

from __future__ import annotations

import json

import torch

import ckpt_track as ct


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))


def main() -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights, sent = {}, []
    with ct.init(project="bucketed", name="rec") as run:
        for step in (1, 2, 3):
            model(torch.randn(8, 32)).sum().backward()
            opt.step()
            stored = run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": 1.0 / step}).wait()
            sent.append(stored.uploaded if stored is not None else None)
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        ref = str(run.ref)
    equal = {}
    for step in (1, 2, 3):
        fresh = _model(9)
        ct.restore(f"{ref}@step={step}", model=fresh)
        equal[step] = all(torch.equal(fresh.state_dict()[k], v) for k, v in weights[step].items())
    listed = [(s.step, sorted(s.aliases)) for s in ct.list_checkpoints(ref)]
    print(json.dumps({"ref": ref, "equal": equal, "listed": listed, "sent": sent}), flush=True)


if __name__ == "__main__":
    main()
