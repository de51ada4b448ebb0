"""A Hugging Face Trainer on 2 CPU processes (DDP over gloo, started with torchrun), logging to
ckpt_track from the world process zero; run by ``test_integration_transformers_ddp.py``:

    python -m torch.distributed.run --nproc_per_node 2 hf_ddp.py STORE NAME MAX_STEPS OUT [REF]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")

from safetensors.torch import save_file
from test_integration_transformers import _model, _Tokens
from transformers import PrinterCallback, Trainer, TrainingArguments

from ckpt_track.integrations.transformers import CkptTrackCallback


def main() -> None:
    store, name, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    settings = {"backend": "local", "local": {"root": store}}
    cb = CkptTrackCallback(project="hf-ddp", name=name, settings=settings)
    resume = str(cb.checkpoint_dir(sys.argv[5])) if len(sys.argv) > 5 else None
    model = _model()
    args = TrainingArguments(output_dir=f"{store}/../hf-{name}", max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_steps=4, report_to="none", seed=0,
                             use_cpu=True, disable_tqdm=True, log_level="error", ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(48, 0), callbacks=[cb])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}, out)


if __name__ == "__main__":
    main()
