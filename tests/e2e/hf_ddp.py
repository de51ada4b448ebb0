"""A Hugging Face Trainer on 2 CPU processes (DDP over gloo, started with torchrun), logging to
ckpt_track from the world process zero; run by ``test_integration_transformers_ddp.py``:

    python -m torch.distributed.run --nproc_per_node 2 hf_ddp.py STORE NAME MAX_STEPS OUT [REF]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments  # noqa: E402

from ckpt_track.integrations.transformers import CkptTrackCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 32, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    store, name, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    settings = {"backend": "local", "local": {"root": store}}
    cb = CkptTrackCallback(project="hf-ddp", name=name, settings=settings)
    resume = str(cb.checkpoint_dir(sys.argv[5])) if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=f"{store}/../hf-{name}", max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_steps=4, report_to="none", seed=0,
                             use_cpu=True, disable_tqdm=True, log_level="error", ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(48, 0), callbacks=[cb])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}, out)


if __name__ == "__main__":
    main()
