"""A Lightning fit with ``strategy="ddp"`` on 2 CPU processes (gloo), logging to ckpt_track;
run by ``test_integration_lightning_ddp.py`` (a script: Lightning's launcher starts the
other rank by running it again):

    python lightning_ddp.py STORE NAME EPOCHS OUT [REF]

Lightning's launcher starts rank 1 by running this script again; rank 0 writes the final
weights and optimizer state to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from ckpt_track.integrations.lightning import CkptTrackCallback, resume_ref

BATCHES = 4  # per rank and epoch


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(32, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        g, n = torch.Generator().manual_seed(1), 2 * BATCHES * 8
        return DataLoader(TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)),
                          batch_size=8, shuffle=True)


def main() -> None:
    store, name, epochs, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ref = resume_ref(sys.argv[5]) if len(sys.argv) > 5 else None  # a reference with ?root=STORE
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    cb = CkptTrackCallback(project="lit-ddp", name=name, every_n_epochs=1, monitor="train_loss",
                           settings={"local": {"root": str(store)}})
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], strategy="ddp", accelerator="cpu", devices=2,
                         deterministic=True, enable_progress_bar=False, logger=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=store.parent / "lightning")
    trainer.fit(model, ckpt_path=ref)
    if trainer.is_global_zero:
        state = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for i, st in trainer.optimizers[0].state_dict()["state"].items():
            state.update({f"opt/{i}/{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
        save_file(state, out)


if __name__ == "__main__":
    main()
