"""The callback: log Lightning's checkpoints to a ckpt_track run, resume with the data order."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import CheckpointIO

import ckpt_track as ct
from ckpt_track.integrations.lightning import data_order
from ckpt_track.integrations.lightning.checkpoint import EXTRA_KEY, SOURCE_KEY, UNSTORED_KEY, storable_checkpoint
from ckpt_track.integrations.lightning.io import CkptTrackCheckpointIO, PathType

__all__ = ["CkptTrackCallback", "dump_checkpoint"]

log = logging.getLogger("ckpt_track")


class _Keep(CheckpointIO):
    """A CheckpointIO that keeps the dict it is given instead of writing it."""

    def __init__(self) -> None:
        self.checkpoint: dict[str, Any] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathType, storage_options: Any | None = None) -> None:
        self.checkpoint = checkpoint

    def load_checkpoint(self, path: PathType, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        raise NotImplementedError("only keeps the checkpoint Trainer.save_checkpoint hands it")

    def remove_checkpoint(self, path: PathType) -> None:
        return None


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The very dict Lightning would write as a checkpoint now (None off rank zero).

    Lightning has no public call that only builds the dict, but ``Trainer.save_checkpoint``
    hands it to the strategy's ``CheckpointIO`` (the plugin contract): for that one call the
    strategy gets an IO that keeps it.  Call it on every rank, as ``save_checkpoint`` wants
    (strategies may gather inside).
    """
    strategy = trainer.strategy
    io, keep = strategy.checkpoint_io, _Keep()
    strategy.checkpoint_io = keep
    try:
        trainer.save_checkpoint("ckpt_track-in-memory.ckpt", weights_only=False)
    finally:
        strategy.checkpoint_io = io
    if keep.checkpoint is None and trainer.is_global_zero:
        raise ct.ConfigError(f"{type(strategy).__name__} does not save through its CheckpointIO, so ckpt_track "
                             "cannot record its checkpoints (sharded strategies are not supported)")
    return keep.checkpoint


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _check_arguments(run: ct.Run | None, steps: int | None, epochs: int | None, monitor: str | None,
                     init: Mapping[str, Any]) -> None:
    for label, value in (("every_n_train_steps", steps), ("every_n_epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ct.ConfigError(f"{label} must be a positive int or None, got {value!r}")
    if run is None:
        return
    given = [k for k in ("project", "name", "run_id", "backend", "config", "settings") if k in init]
    if given:
        raise ct.ConfigError(f"pass either run= or ct.init arguments, not both (got {', '.join(given)})")
    if monitor is not None and monitor != run.settings.monitor:
        raise ct.ConfigError(f"monitor={monitor!r} differs from the run's monitor {run.settings.monitor!r}; "
                             "set it in ct.init(monitor=...)")


class CkptTrackCallback(Callback):
    """Log Lightning checkpoints to ckpt_track; resume from any reference with ``fit(ckpt_path=ref)``.

    ``run``: an existing :class:`ckpt_track.Run`; otherwise one is started on the first
    ``fit`` with ``ct.init(project=, name=, run_id=, backend=, config=, monitor=, mode=,
    resume=, settings=)`` (``config`` defaults to the module's hyper-parameters) and
    finished when ``fit`` ends.  With neither ``every_n_train_steps`` nor
    ``every_n_epochs`` a checkpoint is logged at the end of every epoch.  A step
    checkpoint that falls on the last batch of an epoch is logged at the epoch's end,
    after validation, so that its metrics and resume point include it.

    Pass ``enable_checkpointing=False`` to the Trainer: otherwise Lightning's own
    ``ModelCheckpoint`` (on by default) also writes pickled ``.ckpt`` files, a second save
    of the same state that unpickles when loaded (a warning says so at ``fit``).  To keep a
    ``ModelCheckpoint`` (``save_top_k`` files on disk), add ``plugins=[CkptTrackCheckpointIO()]``:
    its files are then ckpt_track checkpoint directories.

    >>> cb = CkptTrackCallback(project="mnist", every_n_train_steps=100, monitor="val/loss")  # doctest: +SKIP
    >>> L.Trainer(callbacks=[cb], enable_checkpointing=False).fit(model)                   # doctest: +SKIP
    >>> cb.run.ref                                                                         # doctest: +SKIP
    """

    def __init__(
        self,
        run: ct.Run | None = None,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        project: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
        backend: str | list[str] | None = None,
        config: Any = None,
        monitor: str | None = None,
        mode: str | None = None,
        resume: ct.ResumeMode = "auto",
        settings: Mapping[str, Any] | None = None,
        blocking: bool | None = None,
        install_checkpoint_io: bool = True,
    ) -> None:
        init = {k: v for k, v in {"project": project, "name": name, "run_id": run_id, "backend": backend,
                                  "config": config, "monitor": monitor, "mode": mode, "settings": settings}.items()
                if v is not None}
        _check_arguments(run, every_n_train_steps, every_n_epochs, monitor, init)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if (every_n_epochs or every_n_train_steps) else 1
        self.blocking = blocking
        self.install_checkpoint_io = install_checkpoint_io
        self._run = run
        self._owns_run = run is None
        self._open = False  # an owned run is finished when fit ends; the next fit re-attaches to it
        self._trainer: pl.Trainer | None = None
        self._init_kwargs: dict[str, Any] = {**init, "resume": resume}
        self._last_step: int | None = None
        self._deferred = False
        self._warned: set[str] = set()
        self._epoch_start: dict[str, Any] | None = None  # data-order state at the start of this epoch
        self._loaded: dict[str, Any] | None = None  # our callback state from a checkpoint being resumed
        self._resumed_from: str | None = None
        self._quiet: warnings.catch_warnings | None = None  # type: ignore[type-arg]

    @property
    def run(self) -> ct.Run | None:
        """The run checkpoints go to (None before the first ``fit`` and off rank zero); after
        ``fit`` the finished run, e.g. for ``cb.run.ref``."""
        return self._run

    # -- set-up and tear-down ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._last_step, self._deferred, self._epoch_start = None, False, None
        self._loaded, self._resumed_from = None, None
        if stage == "fit" and trainer.is_global_zero and self._owns_run and not self._open:
            kwargs = dict(self._init_kwargs)
            if "config" not in kwargs and pl_module.hparams:
                kwargs["config"] = dict(pl_module.hparams)
            if self._run is not None:  # a later fit with this callback continues its run
                kwargs["run_id"], kwargs["resume"] = self._run.id, "auto"
            # rank zero records the checkpoint Lightning assembles (gathered by the strategy): a
            # single-process run on that rank, so ct.init does not wait for the other ranks
            kwargs["settings"] = {"distributed": "off", **dict(kwargs.get("settings") or {})}
            self._run = ct.init(**kwargs)
            self._open = True
        # references resolve with the run's settings; off rank zero with the same overrides
        settings = self._run.settings if self._run is not None else ct.load_settings(
            dict(self._init_kwargs.get("settings") or {}))
        io = trainer.strategy.checkpoint_io
        if isinstance(io, CkptTrackCheckpointIO):
            io.settings = io.settings or settings
        elif self.install_checkpoint_io:
            trainer.strategy.checkpoint_io = CkptTrackCheckpointIO(settings, fallback=io)
        if stage == "fit" and trainer.is_global_zero:
            self._warn_of_pickles(trainer)

    def _warn_of_pickles(self, trainer: pl.Trainer) -> None:
        """Say so when Lightning's own ModelCheckpoint (on by default) writes pickled ``.ckpt``
        files beside ckpt_track's checkpoints: they cost a second save, and loading one unpickles."""
        io = trainer.strategy.checkpoint_io
        if not trainer.checkpoint_callbacks or (isinstance(io, CkptTrackCheckpointIO) and io.fallback is None):
            return  # no ModelCheckpoint, or it writes ckpt_track directories through the plugin
        if "pickles" not in self._warned:
            self._warned.add("pickles")
            warnings.warn(
                "ckpt_track: Lightning's ModelCheckpoint also writes pickled .ckpt files (on by default); pass "
                "Trainer(enable_checkpointing=False) to keep only ckpt_track's checkpoints, or "
                "Trainer(plugins=[CkptTrackCheckpointIO()]) to write them as ckpt_track directories",
                UserWarning, stacklevel=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(raise_errors=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(raise_errors=False)  # the training error stays the one raised

    def _close(self, raise_errors: bool) -> None:
        self._unquiet()
        run = self._run
        if run is None or (self._owns_run and not self._open):
            return
        try:
            if self._owns_run:
                self._open = False
                run.finish()
            else:
                run.wait()
        except ct.CkptTrackError as exc:
            if raise_errors:
                raise
            log.error("ckpt_track: %s", exc)

    def _unquiet(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    # -- triggers ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._unquiet()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if n is None or step == 0 or step % n or step == self._last_step:
            return
        if data_order.epoch_complete(trainer):
            self._deferred = True  # the epoch's validation and end hooks still belong to this step
            return
        self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not data_order.epoch_complete(trainer):
            return  # stopped mid-epoch (max_steps, early stop): the step checkpoints cover it
        self._epoch_start = data_order.epoch_start("pre", data_order.train_loaders(trainer) or [])
        due = self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if (due or self._deferred) and trainer.global_step != self._last_step:
            self._log(trainer, pl_module)
        self._deferred = False

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = dump_checkpoint(trainer)  # every rank; rank zero records it
        self._last_step = trainer.global_step
        if checkpoint is None or self._run is None or not trainer.is_global_zero or (self._owns_run and not self._open):
            return
        cleaned, notes = storable_checkpoint(checkpoint, self._warned)
        optimizers = trainer.optimizers
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        self._run.log_checkpoint(
            trainer.global_step,
            epoch=trainer.current_epoch,
            model=pl_module,
            optimizer=optimizers[0] if len(optimizers) == 1 else None,
            scheduler=schedulers[0] if len(schedulers) == 1 else None,
            metrics=_scalar_metrics(trainer.callback_metrics),
            extra={EXTRA_KEY: cleaned, UNSTORED_KEY: notes},
            blocking=self.blocking,
        )

    # -- callback state: RNG and data order, saved in every Lightning checkpoint --------------------
    def state_dict(self) -> dict[str, Any]:
        return data_order.callback_state(self._trainer, self._epoch_start)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        source = checkpoint.get(SOURCE_KEY)
        self._resumed_from = source.get("ref") if isinstance(source, Mapping) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            self._epoch_start, skipped = data_order.replay(trainer, self._loaded)
            if skipped:  # held until the first batch: Lightning warns in between, wrongly now
                self._quiet = data_order.quiet_not_resumable()
            self._loaded = None
        else:
            self._epoch_start = data_order.fresh_epoch_start(trainer)
        if self._resumed_from is not None and self._run is not None:
            # records the lineage (resumed_from, the tracker's own link); the state is already restored
            try:
                self._run.mark_resumed(self._resumed_from)
            except ct.CkptTrackError as exc:
                log.warning("ckpt_track: could not record that this run resumed from %s: %s", self._resumed_from, exc)
            self._resumed_from = None
        self._last_step = trainer.global_step  # never re-log the checkpoint resumed from
