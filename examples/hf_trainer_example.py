"""Hugging Face Trainer with ckpt_track: log checkpoints, get preempted, resume from a reference.

Runs on the CPU in a few seconds (a tiny GPT-2 built from a config, random tokens, no downloads):

    python examples/hf_trainer_example.py

1. trains with ``CkptTrackCallback`` and stops after step 6, as if the job were preempted;
2. a new Trainer resumes the same run from ``<run>@latest`` through ``checkpoint_dir``;
3. an uninterrupted run shows that the resumed weights are bit-identical;
4. lists the run's checkpoints and restores the ``best`` one (lowest ``eval_loss``).

The checkpoints go to the configured backend (``./ckpt_runs`` by default); switch tracker
without touching this file, e.g. ``CKPT_TRACK_BACKEND=mlflow``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import ckpt_track as ct
from ckpt_track.integrations.transformers import CkptTrackCallback

STEPS, EVERY, PREEMPTED_AT = 12, 3, 6


class Tokens(torch.utils.data.Dataset):
    """Random token sequences (stand-in for a tokenized corpus)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Preempt(TrainerCallback):
    """Stops training right after the checkpoint at ``step``: a job killed by the scheduler."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def train(out: str, callbacks: list[TrainerCallback], resume: str | None = None) -> Trainer:
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=2,
        logging_steps=EVERY, save_steps=EVERY, eval_strategy="steps", eval_steps=EVERY,
        save_only_model=True,  # the Trainer skips its optimizer/RNG pickles; ckpt_track records the full state
        report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=make_model(), args=args, train_dataset=Tokens(56, 0), eval_dataset=Tokens(16, 1),
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    first = CkptTrackCallback(project="hf-example", resume="never")
    train("hf_example_out/run", [first, Preempt(PREEMPTED_AT)])
    assert first.run is not None
    print(f"preempted after step {PREEMPTED_AT}; run {first.run.ref}")

    # a new process would do exactly this: same run id, resume from the reference
    second = CkptTrackCallback(project="hf-example", run_id=first.run.id)
    path = second.checkpoint_dir(f"{first.run.ref}@latest")
    resumed = train("hf_example_out/run", [second], resume=str(path))
    print(f"resumed from {path.name} and trained to step {resumed.state.global_step}")

    reference = train("hf_example_out/uninterrupted", [])
    ours, theirs = resumed.model.state_dict(), reference.model.state_dict()
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f"weights identical to uninterrupted training: {same}")

    print(f"\n{'step':>4}  {'loss':>7}  {'eval_loss':>9}  aliases")
    for s in ct.list_checkpoints(first.run.ref):
        aliases = ", ".join(a for a in s.aliases if not a.startswith("step-"))
        print(f"{s.step:>4}  {s.metrics.get('loss', float('nan')):7.4f}  {s.metrics['eval_loss']:9.4f}  {aliases}")
    model = make_model()
    best = ct.restore(f"{first.run.ref}@best", model=model)
    print(f"\nrestored the best checkpoint ({best.ref}, step {best.step}) into a fresh model")


if __name__ == "__main__":
    main()
