"""ckpt_track with PyTorch Lightning: log checkpoints from a callback, resume from a reference.

Runs on the CPU in seconds with the embedded local backend (no server):

    python examples/lightning_example.py

A small classifier (with dropout, on shuffled data) trains for 3 epochs while
``CkptTrackCallback`` logs a checkpoint every 4 steps.  The first Trainer dies at step
14, mid-epoch, before its next checkpoint; a new Trainer continues the same run from its
latest checkpoint (``fit(ckpt_path=ref)``) and ends with weights identical to those of an
uninterrupted run.  Then the best checkpoint (lowest ``val_loss``) is restored outside
Lightning.  Switch tracker without touching this file: ``CKPT_TRACK_BACKEND=mlflow``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

import ckpt_track as ct
from ckpt_track.integrations.lightning import CkptTrackCallback, resume_ref

PROJECT, EPOCHS, EVERY, CRASH_AT = "lightning-demo", 3, 4, 14


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.02, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()  # becomes the run's config
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(hidden, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> dict[str, object]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * 8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = (x[:, :3] + 0.3 * torch.randn(320, 3, generator=g)).argmax(1)
    train, val = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    # a seeded generator: ckpt_track stores its state, so a resumed epoch sees the same order
    return (DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(val, batch_size=64))


def fit(callback: CkptTrackCallback | None, ckpt_path: str | None = None, max_steps: int = -1) -> Classifier:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    trainer = pl.Trainer(max_epochs=EPOCHS, max_steps=max_steps, callbacks=[callback] if callback else [],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, accelerator="cpu", devices=1)
    trainer.fit(model, *data(), ckpt_path=ckpt_path)
    return model


def main() -> None:
    # 1. training that dies at step 14; checkpoints were logged at steps 4, 8 and 12
    first = CkptTrackCallback(project=PROJECT, every_n_train_steps=EVERY, monitor="val_loss", mode="min",
                              resume="never")
    fit(first, max_steps=CRASH_AT)
    assert first.run is not None
    run_ref = first.run.ref
    print(f"run {run_ref}: stopped at step {CRASH_AT}")

    # 2. the restarted job: the same run, continued from its latest checkpoint by reference
    ckpt = resume_ref(run_ref)
    print(f"resuming from {ckpt}")
    again = CkptTrackCallback(project=PROJECT, run_id=first.run.id, every_n_train_steps=EVERY,
                              monitor="val_loss", mode="min")
    resumed = fit(again, ckpt_path=ckpt)

    uninterrupted = fit(None)
    reference = uninterrupted.state_dict()
    same = all(torch.equal(v, reference[k]) for k, v in resumed.state_dict().items())
    print(f"final weights identical to an uninterrupted run: {same}")

    table = Table(title=f"checkpoints of {run_ref}")
    for col in ("version", "step", "epoch", "aliases", "train_loss", "val_loss"):
        table.add_column(col)
    for s in ct.list_checkpoints(run_ref):
        aliases = ", ".join(a for a in s.aliases if not a.startswith("step-"))
        table.add_row(f"v{s.version}", str(s.step), str(s.epoch), aliases,
                      *(f"{s.metrics[k]:.4f}" if k in s.metrics else "-" for k in ("train_loss", "val_loss")))
    Console().print(table)

    # 3. the best checkpoint into a plain module, no Lightning Trainer involved
    best_model = Classifier()
    best = ct.restore(f"{run_ref}@best", model=best_model)
    print(f"restored best checkpoint {best.ref}: step {best.step}, val_loss {best.metrics['val_loss']:.4f}")
    print(f"inspect it: ckpt-track ls {run_ref}   |   ckpt-track show {run_ref}@best")


if __name__ == "__main__":
    main()
