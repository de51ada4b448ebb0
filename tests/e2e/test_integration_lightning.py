"""PyTorch Lightning integration: the callback logs checkpoints with Lightning's full state,
and a new Trainer resumed from a ckpt_track reference (the interrupted fit ran in its own
process) ends bit-identical to uninterrupted training, mid-epoch included.

Run as a script, this file is the interrupted training job:
``python test_integration_lightning.py STORE RUN_NAME MAX_STEPS``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_examples_output import checked_command, checked_refs, unrestorable
from torch.utils.data import DataLoader, TensorDataset

import ckpt_track as ct
from ckpt_track.format import verify
from ckpt_track.integrations.lightning import (
    UNSTORED_KEY,
    CkptTrackCallback,
    CkptTrackCheckpointIO,
    lightning_checkpoint,
    resume_ref,
)

EPOCHS, BATCHES, EVERY = 4, 6, 4  # 24 steps; checkpoints at 4, 8, 12 (an epoch's end), 16, 20, 24
STOP = 16  # the interrupted fit dies here: mid-epoch, 4 batches into the third epoch
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_example.py"
_ENV_KEYS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


class Tiny(pl.LightningModule):
    """Dropout, AdamW and a per-step LR schedule: all of it must resume exactly."""

    def __init__(self, lr: float = 1e-2, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(32, 3))
        self.losses: dict[int, float] = {}  # optimizer step -> the train_loss logged for it

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        self.losses[self.global_step + 1] = loss.item()
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g, n = torch.Generator().manual_seed(1), BATCHES * 16
        data = TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g))
        # shuffled by a seeded generator that is never reseeded: its state must travel with the checkpoint
        return DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))

    def val_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(2)
        return DataLoader(TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)),
                          batch_size=16)


def trainer(root: Path, callbacks: list[pl.Callback], max_steps: int = -1, epochs: int = EPOCHS,
            **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, max_steps=max_steps, callbacks=callbacks, deterministic=True,
                      enable_progress_bar=False, logger=False, enable_model_summary=False,
                      default_root_dir=root / "lightning", accelerator="cpu", devices=1, **kwargs)


def callback(store: Path, name: str, **kwargs: Any) -> CkptTrackCallback:
    return CkptTrackCallback(project="lit", name=name, monitor="train_loss", mode="min",
                             settings={"local": {"root": str(store)}}, **kwargs)


def fit(store: Path, name: str, *, max_steps: int = -1, ckpt_path: str | None = None) -> tuple[Tiny, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    t = trainer(store.parent, [callback(store, name, every_n_train_steps=EVERY)], max_steps)
    t.fit(model, ckpt_path=ckpt_path)
    return model, t


def run_ref(store: Path, name: str, selector: str = "") -> str:
    return f"local://lit/{name}{selector}?root={store}"


def assert_same_training_state(a: tuple[Tiny, pl.Trainer], b: tuple[Tiny, pl.Trainer]) -> None:
    (ma, ta), (mb, tb) = a, b
    assert (ta.global_step, ta.current_epoch) == (tb.global_step, tb.current_epoch) == (EPOCHS * BATCHES, EPOCHS)
    wa, wb = ma.state_dict(), mb.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert ta.lr_scheduler_configs[0].scheduler.state_dict() == tb.lr_scheduler_configs[0].scheduler.state_dict()


# -- the shared runs -------------------------------------------------------------------------
@dataclass
class Runs:
    store: Path
    uninterrupted: tuple[Tiny, pl.Trainer]
    interrupted: subprocess.CompletedProcess[str]
    example: subprocess.CompletedProcess[str]


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_") and k not in _ENV_KEYS}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, _ = proc.communicate(timeout=600)  # a safety net only: both take seconds
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """The interrupted fit and the example in their own processes, the uninterrupted fit here,
    all at once: a new Python process spends seconds importing Lightning."""
    root = tmp_path_factory.mktemp("lightning")
    store = root / "store"
    (root / "example").mkdir()
    interrupted = _start([__file__, str(store), "interrupted", str(STOP)], root)
    example = _start(checked_command(EXAMPLE)[1:], root / "example")  # records each printed reference
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            for key in [k for k in os.environ if k.startswith("CKPT_TRACK_") or k in _ENV_KEYS]:
                mp.delenv(key)
            mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
            deterministic = torch.are_deterministic_algorithms_enabled()
            try:
                uninterrupted = fit(store, "uninterrupted")
            finally:
                torch.use_deterministic_algorithms(deterministic)
    finally:
        done = _finish(interrupted), _finish(example)
    yield Runs(store, uninterrupted, *done)


@pytest.fixture(autouse=True)
def _lightning_globals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``deterministic=True`` and ``seed_everything`` change process-wide state: give it back."""
    for key in _ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called: a ckpt_track load path unpickled")

    monkeypatch.setattr(torch, "load", refuse)


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_from_reference_in_new_trainer_is_bit_identical(runs: Runs, no_unpickling: None,
                                                               recwarn: pytest.WarningsRecorder) -> None:
    assert runs.interrupted.returncode == 0, runs.interrupted.stdout
    assert f"stopped at step {STOP}" in runs.interrupted.stdout
    store = runs.store
    assert [s.step for s in ct.list_checkpoints(run_ref(store, "interrupted"))] == [4, 8, 12, 16]

    # the restarted job: same run name, continued from its latest checkpoint (step 16, mid-epoch)
    ref = resume_ref(run_ref(store, "interrupted"))
    assert ref is not None and ref.startswith("local://lit/") and ":v4" in ref
    resumed = fit(store, "interrupted", ckpt_path=ref)

    assert_same_training_state(runs.uninterrupted, resumed)
    # Lightning's warning that a plain dataloader cannot resume mid-epoch does not apply here
    assert not [w for w in recwarn if "ended before the epoch ended" in str(w.message)]
    stored = ct.list_checkpoints(run_ref(store, "interrupted"))
    assert [s.step for s in stored] == [4, 8, 12, 16, 20, 24]
    assert stored[4].lineage["resumed_from"] == str(stored[3].ref)
    assert stored[4].lineage["parent"] == str(stored[3].ref)


@pytest.mark.slow
@pytest.mark.parametrize("step", [4, 12])  # mid-way through the first epoch; the end of the second
def test_resume_from_earlier_checkpoint_of_another_run_is_bit_identical(runs: Runs, step: int,
                                                                        no_unpickling: None) -> None:
    assert runs.interrupted.returncode == 0, runs.interrupted.stdout
    ref = run_ref(runs.store, "interrupted", f"@step={step}")
    resumed = fit(runs.store, f"from-{step}", ckpt_path=ref)
    assert_same_training_state(runs.uninterrupted, resumed)
    first = ct.list_checkpoints(run_ref(runs.store, f"from-{step}"))[0]
    assert first.step == step + EVERY
    assert first.lineage["resumed_from"] == str(ct.list_checkpoints(ref)[step // EVERY - 1].ref)


@pytest.mark.slow
def test_resume_without_the_callback_diverges(runs: Runs) -> None:
    """Guards the tests above: the loader state the callback replays is what makes them pass."""
    assert runs.interrupted.returncode == 0, runs.interrupted.stdout
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    t = trainer(runs.store.parent, [], plugins=[CkptTrackCheckpointIO()])
    t.fit(model, ckpt_path=run_ref(runs.store, "interrupted", "@step=16"))
    assert t.global_step == EPOCHS * BATCHES
    reference = runs.uninterrupted[0].state_dict()
    assert not all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


# -- what is logged -----------------------------------------------------------------------------
@pytest.mark.slow
def test_checkpoints_carry_logged_metrics_and_best_follows_the_monitor(runs: Runs) -> None:
    model, _ = runs.uninterrupted
    stored = ct.list_checkpoints(run_ref(runs.store, "uninterrupted"))
    assert [s.step for s in stored] == list(range(EVERY, EPOCHS * BATCHES + 1, EVERY))
    for s in stored:
        assert s.metrics["train_loss"] == model.losses[s.step], s.step  # what the module logged at that step
    # a checkpoint on an epoch's last batch waits for the epoch's validation
    assert all("val_loss" in s.metrics for s in stored if s.step % BATCHES == 0)
    best = min(stored, key=lambda s: s.metrics["train_loss"])
    assert [s.step for s in stored if "best" in s.aliases] == [best.step]
    assert [s.step for s in stored if "latest" in s.aliases] == [EPOCHS * BATCHES]
    assert ct.restore(run_ref(runs.store, "uninterrupted", "@best")).step == best.step

    # Lightning's own checkpoint dict is inside, and the weights restore without Lightning
    ckpt = lightning_checkpoint(run_ref(runs.store, "uninterrupted", "@latest"))
    assert ckpt["global_step"] == EPOCHS * BATCHES and ckpt["hyper_parameters"] == {"lr": 1e-2, "extra": None}
    assert {"loops", "optimizer_states", "lr_schedulers", "callbacks", "state_dict"} <= ckpt.keys()
    fresh = Tiny()
    ct.restore(run_ref(runs.store, "uninterrupted"), model=fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.slow
def test_example_runs_and_resumes_bit_identical(runs: Runs) -> None:
    out = runs.example.stdout
    assert runs.example.returncode == 0, out
    assert "stopped at step 14" in out
    assert "final weights identical to an uninterrupted run: True" in out
    assert "restored best checkpoint local://lightning-demo/" in out
    log = runs.store.parent / "example" / "refs.jsonl"
    assert checked_refs(log) and not unrestorable(log)  # every reference it printed was stored by then


# -- unstorable values, the CheckpointIO plugin, an existing run ------------------------------
class Odd(Tiny):
    """Hyper-parameters and a checkpoint hook with values JSON cannot hold."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["odd"] = {"kept": 3, "a_set": {1, 2}}


def test_values_json_cannot_hold_are_stringified_or_left_out_with_a_warning(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = Odd(extra={"act": torch.nn.GELU(), "where": tmp_path})
    t = trainer(tmp_path, [callback(store, "odd", every_n_epochs=1)], epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"hyper_parameters/extra/act: stored as its repr") as record:
        t.fit(model)
    message = " ".join(str(w.message) for w in record)
    assert "hyper_parameters/extra/where: stored as its repr" in message
    assert "/odd/a_set: left out (a set cannot be stored)" in message

    with pytest.warns(UserWarning, match="saved without /odd/a_set"):
        ckpt = lightning_checkpoint(run_ref(store, "odd"))
    assert ckpt["hyper_parameters"]["extra"] == {"act": repr(torch.nn.GELU()), "where": repr(tmp_path)}
    assert ckpt["odd"] == {"kept": 3}
    assert ckpt["ckpt_track"]["step"] == BATCHES

    # and such a checkpoint still resumes
    t2 = trainer(tmp_path, [callback(store, "odd", every_n_epochs=1)], epochs=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t2.fit(Odd(extra={"act": torch.nn.GELU()}), ckpt_path=resume_ref(run_ref(store, "odd")))
    assert t2.global_step == 2 * BATCHES
    assert [s.step for s in ct.list_checkpoints(run_ref(store, "odd"))] == [BATCHES, 2 * BATCHES]
    notes = ct.restore(run_ref(store, "odd")).extra[UNSTORED_KEY]
    assert any("a_set" in n for n in notes)


def test_checkpoint_io_plugin_saves_and_loads_ckpt_track_directories(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickled")

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=EVERY, save_last=True, save_top_k=1)
    t = trainer(tmp_path, [saver], max_steps=10, plugins=[CkptTrackCheckpointIO()], enable_checkpointing=True,
                limit_val_batches=0)
    t.fit(Tiny())
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["epoch=1-step=8.ckpt", "last.ckpt"]  # step 4's removed through the plugin
    for name in names:  # each a verified ckpt_track checkpoint directory; last.ckpt was replaced whole
        assert verify(tmp_path / "ckpts" / name).step == 8

    t2 = trainer(tmp_path, [], plugins=[CkptTrackCheckpointIO()], limit_val_batches=0)
    model = Tiny()
    t2.fit(model, ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"))
    assert t2.global_step == EPOCHS * BATCHES
    with pytest.raises(ct.CheckpointNotFound, match="never unpickles"):
        CkptTrackCheckpointIO().load_checkpoint(str(tmp_path / "model.ckpt"))


def test_documented_snippet_writes_no_pickled_ckpt_files(tmp_path: Path) -> None:
    import ckpt_track.integrations.lightning as integration

    store = tmp_path / "store"
    # Lightning's default (enable_checkpointing=True) adds a ModelCheckpoint that pickles: warned
    t = trainer(tmp_path / "default", [callback(store, "default", every_n_epochs=1)], epochs=1,
                enable_checkpointing=True, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"enable_checkpointing=False"):
        t.fit(Tiny())
    assert list((tmp_path / "default").rglob("*.ckpt"))

    # the documented snippet: Trainer(callbacks=[cb], enable_checkpointing=False)
    assert "enable_checkpointing=False" in integration.__doc__  # type: ignore[operator]
    assert "enable_checkpointing=False" in (CkptTrackCallback.__doc__ or "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        t = trainer(tmp_path / "snippet", [callback(store, "snippet", every_n_epochs=1)], epochs=1,
                    enable_checkpointing=False, limit_val_batches=0)
        t.fit(Tiny())
    assert not list((tmp_path / "snippet").rglob("*.ckpt"))  # nothing pickled: only ckpt_track's version
    assert [s.step for s in ct.list_checkpoints(run_ref(store, "snippet"))] == [BATCHES]


def test_callback_logs_to_an_existing_run_and_leaves_it_open(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = ct.init(project="lit", name="mine", monitor="train_loss", settings={"local": {"root": str(store)}})
    t = trainer(tmp_path, [CkptTrackCallback(run, every_n_train_steps=5)], max_steps=10, limit_val_batches=0)
    model = Tiny()
    t.fit(model)
    assert [s.step for s in run.checkpoints()] == [5, 10]
    run.log_checkpoint(11, model=model, blocking=True)  # still open: fit did not finish it
    run.finish()
    assert resume_ref(run_ref(store, "mine")) == f"{run.ref}:v3?root={store}"


def test_bad_arguments_fail_at_once(tmp_path: Path) -> None:
    assert resume_ref(f"local://lit/nothing-yet?root={tmp_path}") is None
    with pytest.raises(ct.ConfigError, match="every_n_train_steps"):
        CkptTrackCallback(project="lit", every_n_train_steps=0)
    run = ct.init(project="lit", monitor="val_loss", settings={"local": {"root": str(tmp_path)}})
    with pytest.raises(ct.ConfigError, match="not both"):
        CkptTrackCallback(run, project="other")
    with pytest.raises(ct.ConfigError, match="differs from the run's monitor"):
        CkptTrackCallback(run, monitor="train_loss")
    assert CkptTrackCallback(run).every_n_epochs == 1  # the default: every epoch
    run.finish()


# -- Lightning internals: all in one shim, which fails here when Lightning changes them ----------
LIGHTNING_PKG = Path(ct.__file__).parent / "integrations" / "lightning"


def test_the_compat_shim_matches_the_installed_lightning(tmp_path: Path) -> None:
    """The one private Lightning internal ckpt_track relies on (the fit loop's data fetcher) is
    still there and behaves as the mid-epoch replay needs; a Lightning update that changes it
    must fail here, not replay the wrong data order silently."""
    from ckpt_track.integrations.lightning import _compat

    assert _compat.problems() == [], f"Lightning {pl.__version__} changed what _compat.py relies on"

    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["plain"] = _compat.plain_fetcher(trainer) is not None
            seen["ahead"] = _compat.prefetched(trainer)

    trainer(tmp_path, [Probe()], max_steps=1, limit_val_batches=0).fit(Tiny())
    assert seen == {"plain": True, "ahead": 0}


def test_only_the_shim_touches_private_lightning_names() -> None:
    """Private Lightning imports and private attributes of anything but our own objects stay in _compat.py."""
    bad = []
    for path in sorted(LIGHTNING_PKG.glob("*.py")):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
                if "._" in (node.module or ""):
                    bad.append(f"{path.name}: {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                bad.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not bad, bad


def _main() -> int:
    store, name, max_steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    _, t = fit(store, name, max_steps=max_steps)
    print(f"stopped at step {t.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
