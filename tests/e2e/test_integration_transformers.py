"""The Hugging Face Trainer integration: checkpoints logged from ``on_save`` and a Trainer
resumed from a ckpt_track reference, bit-identical to uninterrupted training."""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_examples_output import checked_command, checked_refs, unrestorable

import ckpt_track as ct

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, Trainer

    from ckpt_track.integrations.transformers import CkptTrackCallback

EXAMPLE = Path(__file__).parents[2] / "examples" / "hf_trainer_example.py"
# 48 samples / batch 8 = 6 steps an epoch: resuming at step 4 is mid-epoch and crosses an epoch end
STEPS, EVERY, RESUME_AT = 8, 4, 4


@pytest.fixture(scope="module", autouse=True)
def _import_transformers() -> Iterator[None]:
    """Import transformers here, not at collection.  It imports comet_ml when installed, and
    comet_ml reads its settings on import (test_backend_comet sets them first) and, unless told
    not to, patches mlflow's client to copy every upload into a Comet experiment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
        mp.setenv("COMET_ERROR_TRACKING_ENABLE", "false")
        import transformers.trainer  # noqa: F401  (the import that pulls in comet_ml)
    yield


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random token sequences; the model learns their unigram statistics."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 32, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 ties lm_head to the embeddings and has dropout: both must survive the round trip
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _train(out: str, callback: CkptTrackCallback | None, resume: str | None = None, **args: Any) -> Trainer:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    options: dict[str, Any] = {
        "max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 2,
        "logging_steps": 1, "save_steps": EVERY, "eval_strategy": "steps", "eval_steps": EVERY,
        "metric_for_best_model": "loss", "report_to": "none", "seed": 0, "use_cpu": True, "disable_tqdm": True,
        "log_level": "error", **args,
    }
    trainer = Trainer(model=_model(), args=TrainingArguments(output_dir=out, **options),
                      train_dataset=_Tokens(48, 0), eval_dataset=_Tokens(16, 1),
                      callbacks=[callback] if callback else None)
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logged(trainer: Trainer, after: int) -> list[tuple[int, str, float]]:
    """(step, name, value) of every loss and rate the Trainer logged after step ``after``."""
    return [(e["step"], k, e[k]) for e in trainer.state.log_history if e["step"] > after
            for k in ("loss", "grad_norm", "learning_rate", "eval_loss") if k in e]


@pytest.fixture(params=["local", "mlflow"])
def settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "local":
        return {"backend": "local"}
    uri = request.getfixturevalue("mlflow_env").uri
    return {"backend": "mlflow", "mlflow": {"tracking_uri": uri}}


@pytest.mark.slow
def test_resume_from_a_reference_is_bit_identical(settings: dict[str, Any]) -> None:
    from ckpt_track.integrations.transformers import CkptTrackCallback

    full_cb = CkptTrackCallback(project="hf", name="full", settings=settings)
    full = _train("out-full", full_cb)
    assert full_cb.run is not None
    ref = full_cb.run.ref

    stored = ct.list_checkpoints(ref, ct.load_settings(settings))
    assert [s.step for s in stored] == [4, 8]
    for s in stored:  # the Trainer's own numbers at that step
        entries = [e for e in full.state.log_history if e["step"] == s.step]
        assert s.metrics["loss"] == next(e["loss"] for e in entries if "loss" in e)
        assert s.metrics["eval_loss"] == next(e["eval_loss"] for e in entries if "eval_loss" in e)
    best = next(s for s in stored if "best" in s.aliases)
    assert best.step == full.state.best_global_step  # the metric the Trainer tracks decides `best`
    assert "latest" in stored[-1].aliases

    resumed_cb = CkptTrackCallback(project="hf", name="resumed", settings=settings)
    path = resumed_cb.checkpoint_dir(f"{ref}@step={RESUME_AT}")
    resumed = _train("out-resumed", resumed_cb, resume=str(path))

    a, b = full.model.state_dict(), resumed.model.state_dict()  # identical weights, not only a close loss
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(resumed, RESUME_AT) == _logged(full, RESUME_AT)  # every later loss, exactly
    assert [e for e in _logged(resumed, RESUME_AT) if e[:2] == (STEPS, "loss")]  # the final loss is among them

    assert resumed_cb.run is not None
    later = ct.list_checkpoints(resumed_cb.run.ref, ct.load_settings(settings))
    assert [s.step for s in later] == [8]
    assert later[0].lineage["resumed_from"] == str(stored[0].ref)


PICKLES = {".pt", ".pth", ".bin", ".pkl"}


@pytest.mark.slow
def test_without_trainer_checkpoints_no_pickle_is_written_and_resume_is_bit_identical() -> None:
    from ckpt_track.integrations.transformers import CkptTrackCallback

    full_cb = CkptTrackCallback(project="hf", name="full", trainer_checkpoints=False)
    full = _train("out-full", full_cb)
    assert full_cb.run is not None
    ref = full_cb.run.ref
    stored = ct.list_checkpoints(ref)
    assert [s.step for s in stored] == [4, 8]  # the saves the Trainer scheduled (save_steps), each once
    for s in stored:  # recorded after that step's log and evaluation, as the Trainer's own save
        entries = [e for e in full.state.log_history if e["step"] == s.step]
        assert s.metrics["loss"] == next(e["loss"] for e in entries if "loss" in e)
        assert s.metrics["eval_loss"] == next(e["eval_loss"] for e in entries if "eval_loss" in e)
    assert next(s for s in stored if "best" in s.aliases).step == full.state.best_global_step
    last = ct.restore(f"{ref}@step=8").extra["transformers"]["trainer_state"]
    assert (last["best_metric"], last["best_global_step"]) == (full.state.best_metric, full.state.best_global_step)

    resumed_cb = CkptTrackCallback(project="hf", name="resumed", trainer_checkpoints=False)
    path = resumed_cb.checkpoint_dir(f"{ref}@step={RESUME_AT}")
    assert (path / "optimizer.pt").exists()  # what the Trainer reads; gone once it has read it
    resumed = _train("out-resumed", resumed_cb, resume=str(path))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(resumed, RESUME_AT) == _logged(full, RESUME_AT)
    assert resumed_cb.run is not None
    assert [s.step for s in ct.list_checkpoints(resumed_cb.run.ref)] == [8]

    assert not path.exists()
    left = [p for p in Path.cwd().rglob("*") if p.suffix in PICKLES]  # outputs, cache, store: none
    assert left == []
    assert not list(Path.cwd().rglob("checkpoint-*"))


@pytest.mark.slow
def test_best_without_evaluation_warns_and_a_forced_trainer_save_is_removed() -> None:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from ckpt_track.integrations.transformers import CkptTrackCallback

    no_eval = {"max_steps": 2, "save_steps": 1, "eval_strategy": "no"}
    with pytest.warns(UserWarning, match="never evaluates") as record:
        _train("out-a", CkptTrackCallback(project="hf", name="a"), **no_eval)  # metric_for_best_model="loss"
    assert sum("never evaluates" in str(w.message) for w in record) == 1  # once, at train begin

    class Force(TrainerCallback):  # another callback asks the Trainer for a save after ours ran
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_save = True

    cb = CkptTrackCallback(project="hf", name="b", monitor="loss", trainer_checkpoints=False)

    trainer = Trainer(model=_model(), train_dataset=_Tokens(48, 0), callbacks=[cb, Force()],
                      args=TrainingArguments(output_dir="out-b", max_steps=2, per_device_train_batch_size=8,
                                             save_steps=10, logging_steps=1, report_to="none", use_cpu=True,
                                             disable_tqdm=True, log_level="error"))
    trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # monitor="loss" needs no evaluation: no warning
        trainer.train()
    assert cb.run is not None
    assert [s.step for s in ct.list_checkpoints(cb.run.ref)] == [1, 2]
    assert not list(Path("out-b").glob("checkpoint-*"))  # recorded, then the Trainer's copy removed

    run = ct.init(project="hf", name="d", monitor=None)  # a run of the user's own, nothing decides best
    _train("out-d", CkptTrackCallback(run=run), max_steps=2, save_steps=1, eval_strategy="no")
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1, 2]

    with pytest.raises(ct.ConfigError, match="load_best_model_at_end"):
        _train("out-c", CkptTrackCallback(project="hf", name="c", trainer_checkpoints=False),
               load_best_model_at_end=True)


@pytest.mark.slow
def test_checkpoint_dir_matches_the_trainers_own_directory() -> None:
    from transformers.trainer_pt_utils import safe_globals

    from ckpt_track.integrations.transformers import CkptTrackCallback, checkpoint_dir

    cb = CkptTrackCallback(project="hf", name="files")
    _train("out", cb, max_steps=EVERY)
    assert cb.run is not None
    handle = cb.handles[-1]
    stored = handle.wait()
    assert stored is not None and stored.step == EVERY

    # what ckpt_track stored holds no pickle: safetensors and JSON only
    ckpt_path = Path("ckpt_runs") / "hf" / cb.run.id / "checkpoints" / f"v{stored.version:06d}"
    assert {p.suffix for p in ckpt_path.iterdir()} == {".safetensors", ".json"}
    state = json.loads((ckpt_path / "state.json").read_text())
    assert state["extra"]["transformers"]["trainer_state"]["global_step"] == EVERY

    ours = checkpoint_dir(handle.ref, Path("resume-here"))
    theirs = Path("out") / f"checkpoint-{EVERY}"
    assert {p.name for p in theirs.iterdir()} - {p.name for p in ours.iterdir()} == {
        "training_args.bin", "generation_config.json"}  # the Trainer reads neither when resuming
    assert (ours / "trainer_state.json").read_bytes() == (theirs / "trainer_state.json").read_bytes()
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # the tied copy left out, as save_pretrained does
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        with safe_globals():  # exactly as the Trainer loads them
            _equal(torch.load(ours / name, weights_only=True), torch.load(theirs / name, weights_only=True), name)
    assert json.loads((ours / "config.json").read_text())["n_embd"] == 16

    assert checkpoint_dir(handle.ref, Path("resume-here")) == ours  # already there: reused
    cached = checkpoint_dir(f"{cb.run.ref}@latest")
    assert cached.name == f"checkpoint-{EVERY}" and Path.cwd() / "cache" in cached.parents
    assert checkpoint_dir(handle.ref) == cached
    Path("busy").mkdir()
    (Path("busy") / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint_dir(handle.ref, Path("busy"))


def _equal(a: Any, b: Any, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_best_follows_greater_is_better() -> None:
    from ckpt_track.integrations.transformers import CkptTrackCallback

    # an odd choice on purpose: the highest eval loss is "best", which the default would never pick
    cb = CkptTrackCallback(project="hf", name="max")
    trainer = _train("out", cb, max_steps=4, save_steps=1, eval_steps=1, greater_is_better=True)
    assert cb.run is not None
    stored = ct.list_checkpoints(cb.run.ref)
    best = next(s for s in stored if "best" in s.aliases)
    assert best.step == trainer.state.best_global_step
    assert best.metrics["eval_loss"] == max(s.metrics["eval_loss"] for s in stored)
    assert best.metrics["eval_loss"] > min(s.metrics["eval_loss"] for s in stored)


@pytest.mark.slow
def test_a_run_passed_in_is_logged_into_and_left_open() -> None:
    from ckpt_track.integrations.transformers import CkptTrackCallback

    run = ct.init(project="hf", name="mine", monitor="eval_loss")
    _train("out", CkptTrackCallback(run), max_steps=4, save_steps=2, eval_steps=2, logging_steps=2)
    assert [s.step for s in run.checkpoints()] == [2, 4]
    run.log_checkpoint(5, metrics={"eval_loss": 0.0}, blocking=True)  # still open
    run.finish()
    with pytest.raises(ct.ConfigError, match="not both"):
        CkptTrackCallback(run, project="hf")


def test_checkpoint_dir_needs_a_trainer_checkpoint() -> None:
    from ckpt_track.integrations.transformers import checkpoint_dir

    with ct.init(project="plain", name="loop") as run:
        run.log_checkpoint(3, model=torch.nn.Linear(2, 2), blocking=True)
    with pytest.raises(ct.StateMismatch, match="not logged by CkptTrackCallback"):
        checkpoint_dir(f"{run.ref}@step=3", Path("here"))
    assert not Path("here").exists()


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    done = subprocess.run(checked_command(EXAMPLE), cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    log = tmp_path / "refs.jsonl"
    assert checked_refs(log) and not unrestorable(log)  # every reference it printed was stored by then
    assert "weights identical to uninterrupted training: True" in done.stdout
    assert "restored the best checkpoint" in done.stdout


def test_the_trainer_layout_matches_the_installed_transformers() -> None:
    """``checkpoint_dir`` writes what the Trainer reads back with private methods
    (``_load_rng_state`` and friends); their file names and the RNG file's keys must still be
    the ones the integration writes, or a resume would silently skip them."""
    import inspect

    import transformers.trainer as trainer_module
    from transformers import Trainer
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

    from ckpt_track.integrations import trainer_dir as integration

    assert (integration.WEIGHTS, integration.CONFIG) == (SAFE_WEIGHTS_NAME, CONFIG_NAME)
    assert (integration.TRAINER_STATE, integration.OPTIMIZER, integration.SCHEDULER, integration.SCALER) == (
        trainer_module.TRAINER_STATE_NAME, trainer_module.OPTIMIZER_NAME, trainer_module.SCHEDULER_NAME,
        trainer_module.SCALER_NAME)
    load_rng = inspect.getsource(Trainer._load_rng_state)
    assert f'"{integration.RNG}"' in load_rng
    for key in ("python", "numpy", "cpu"):  # (the resume tests check that they restore bit-identically)
        assert f'checkpoint_rng_state["{key}"]' in load_rng, key
