"""PyTorch Lightning integration: log checkpoints from a callback, resume from any reference.

>>> from ckpt_track.integrations.lightning import CkptTrackCallback, resume_ref
>>> cb = CkptTrackCallback(project="mnist", name="run-1", every_n_train_steps=100)  # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[cb])                                             # doctest: +SKIP
>>> trainer.fit(model, ckpt_path=resume_ref("local://mnist/run-1"))                 # doctest: +SKIP

``resume_ref`` gives the run's latest checkpoint, or None on the first start (a fresh
fit); any reference works as ``ckpt_path``: ``"local://mnist/run-1@best"``,
``"mlflow://<run_id>@step=300"``, a tracker UI URL.

Logging
-------
:class:`CkptTrackCallback` logs a checkpoint every ``every_n_train_steps`` optimizer
steps and/or every ``every_n_epochs`` epochs (default: every epoch), at
``trainer.global_step``, with the scalar ``trainer.callback_metrics`` of that moment
(``latest``; ``best`` follows ``monitor``/``mode``).  It asks Lightning for the very
checkpoint dict Lightning would write itself (model, optimizers, LR schedulers, fit-loop
progress, callback states, precision state, hyper-parameters) and records it through the
run's backend: the module, the first optimizer and scheduler as ckpt_track's standard
entries (so ``ct.restore(ref, model=module)`` works without Lightning), the whole
Lightning dict under ``extra["lightning"]`` (tensors shared with the standard entries
are stored once), and the RNG states.  The run is made by ``ct.init`` from the
callback's arguments on the first ``fit``, or passed in as ``run=``.

Resuming
--------
Lightning reads ``ckpt_path`` through the strategy's ``CheckpointIO``.  At ``setup`` the
callback wraps that IO in a :class:`CkptTrackCheckpointIO` that loads ckpt_track
references (verified, safetensors + JSON, never unpickled) and hands every other path
to the IO it wraps, so ``Trainer(callbacks=[cb]).fit(model, ckpt_path=ref)`` is all it
takes.  ``Trainer(plugins=[CkptTrackCheckpointIO()])`` also works without the callback,
and then also saves ``ModelCheckpoint`` / ``trainer.save_checkpoint`` files in the
ckpt_track format (a directory) instead of pickles.

Lightning resumes mid-epoch exactly only from dataloaders that have ``state_dict``;
a plain ``DataLoader(shuffle=True, generator=g)`` would replay a different order.  The
callback therefore also stores, in its own callback state, the train dataloaders'
``torch.Generator`` states and the global RNG at the start of the current epoch, plus
how many batches were drawn; on resume it replays the epoch's shuffle and skips the
batches already seen, so training continues bit-identically mid-epoch too (tested).
Keep the callback in the resumed Trainer: the plugin alone restores what Lightning
itself stores, but not the data order.

Values the JSON codec cannot store (a module or a path among the hyper-parameters,
anything odd a ``on_save_checkpoint`` hook adds) never stop training: hyper-parameters
are kept as their ``repr``, any other such value is left out, each with a warning, and
the checkpoint lists them under ``extra["lightning_unstored"]``.

Limits: one process (or DDP, where rank zero logs); sharded strategies (FSDP,
DeepSpeed) are not supported.  The exact data-order replay needs sized, map-style train
dataloaders with ``num_workers=0`` or random augmentations that do not depend on worker
seeds, and no ``reload_dataloaders_every_n_epochs``; otherwise a warning says the order
may differ.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH, _Stateful
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import CheckpointIO

import ckpt_track as ct
from ckpt_track import ResumeMode
from ckpt_track.config import Settings
from ckpt_track.errors import CheckpointNotFound, ConfigError, InvalidRef, SerializationError
from ckpt_track.format import MANIFEST, load_checkpoint, write_checkpoint
from ckpt_track.policy import select
from ckpt_track.refs import parse_ref
from ckpt_track.resolve import resolve
from ckpt_track.state import apply, capture, decode_tree, encode_tree
from ckpt_track.writer import snapshot_tensors

__all__ = ["CkptTrackCallback", "CkptTrackCheckpointIO", "lightning_checkpoint", "resume_ref"]

log = logging.getLogger("ckpt_track")

EXTRA_KEY = "lightning"
UNSTORED_KEY = "lightning_unstored"
SOURCE_KEY = "ckpt_track"  # added to a loaded Lightning dict: which checkpoint it came from
_HPARAM_KEYS = frozenset({
    pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, pl.LightningModule.CHECKPOINT_HYPER_PARAMS_TYPE,
    pl.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY, pl.LightningDataModule.CHECKPOINT_HYPER_PARAMS_TYPE,
})
_DROP = object()
# Lightning warns that a plain dataloader cannot resume mid-epoch; after a replay it did
_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


# -- Lightning's checkpoint dict <-> the ckpt_track codec ------------------------------
def _storable(value: Any) -> bool:
    try:
        encode_tree(value, "v")
    except SerializationError:
        return False
    return True


def _clean(obj: Any, path: str, stringify: bool, notes: list[str]) -> Any:
    """``obj`` with every value the codec rejects replaced: by its repr when ``stringify``, else dropped
    (``_DROP``; inside a list or tuple ``None``, so positions keep their meaning)."""
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            where = f"{path}/{key}"
            if not (isinstance(key, str) or _storable(key)):
                notes.append(f"{where}: left out (a key of type {type(key).__qualname__})")
                continue
            cleaned = _clean(value, where, stringify or (path == "" and key in _HPARAM_KEYS), notes)
            if cleaned is not _DROP:
                out[key] = cleaned
        return out
    if isinstance(obj, (list, tuple)):
        items = [_clean(v, f"{path}/{i}", stringify, notes) for i, v in enumerate(obj)]
        items = [None if v is _DROP else v for v in items]
        return items if isinstance(obj, list) else tuple(items)
    if _storable(obj):
        return obj
    if stringify:
        notes.append(f"{path}: stored as its repr (a {type(obj).__qualname__})")
        return repr(obj)
    notes.append(f"{path}: left out (a {type(obj).__qualname__} cannot be stored)")
    return _DROP


def _storable_checkpoint(checkpoint: Mapping[str, Any], warned: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Lightning's dict made storable, and notes on what was changed (each warned about once)."""
    notes: list[str] = []
    cleaned = _clean(checkpoint, "", False, notes)
    new = [n for n in notes if n not in warned]
    if new:
        warned.update(new)
        warnings.warn("ckpt_track: parts of the Lightning checkpoint are not JSON or tensors: " + "; ".join(new),
                      UserWarning, stacklevel=3)
    return cleaned, notes


class _Fixed:
    """Hands a ready state dict to :func:`capture`, which asks objects for ``state_dict()``."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state


def _rebuild(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], step: int,
             epoch: int | None) -> dict[str, Any]:
    extra = tree.get("extra") or {}
    if EXTRA_KEY in extra:
        checkpoint: dict[str, Any] = decode_tree(extra[EXTRA_KEY], tensors)
        dropped = [n for n in extra.get(UNSTORED_KEY) or [] if "left out" in n]
        if dropped:
            warnings.warn("ckpt_track: this checkpoint was saved without " + "; ".join(dropped), UserWarning,
                          stacklevel=4)
        return checkpoint
    # logged outside Lightning: weights, optimizer and scheduler, but no loop progress
    checkpoint = {"epoch": epoch or 0, "global_step": step, "pytorch-lightning_version": pl.__version__}
    if "model" in tree:
        checkpoint["state_dict"] = decode_tree(tree["model"], tensors)
    if "optimizer" in tree:
        checkpoint["optimizer_states"] = [decode_tree(tree["optimizer"], tensors)]
    if "scheduler" in tree:
        checkpoint["lr_schedulers"] = [decode_tree(tree["scheduler"], tensors)]
    return checkpoint


def _set_rng_from(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng" in tree:
        apply({"step": 0, "rng": tree["rng"]}, tensors, rng=True)


def lightning_checkpoint(ref: str | os.PathLike[str], *, settings: Settings | None = None,
                         rng: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint dict a ckpt_track reference (or a checkpoint directory) holds.

    Verified before anything is read; tensors come from safetensors, the rest from JSON.
    ``rng=True`` also restores the global RNG states saved with it.  The dict gets a
    ``"ckpt_track"`` entry naming its source (``ref``, ``step``, ``metrics``).

    >>> ckpt = lightning_checkpoint("local://mnist/run-1@best")  # doctest: +SKIP
    >>> model.load_state_dict(ckpt["state_dict"])                # doctest: +SKIP
    """
    local = Path(ref) if not isinstance(ref, str) or os.path.isdir(ref) else None
    if local is not None:
        manifest, tensors, tree = load_checkpoint(local)
        source: dict[str, Any] = {"ref": None, "path": str(local)}
    else:
        found = resolve(str(ref), settings)
        fetched = found.fetch().path
        manifest, tensors, tree = load_checkpoint(fetched)
        source = {"ref": str(found.stored.ref), "path": str(fetched)}
    checkpoint = _rebuild(tree, tensors, manifest.step, manifest.epoch)
    if rng:
        _set_rng_from(tree, tensors)
    checkpoint[SOURCE_KEY] = {**source, "step": manifest.step, "metrics": dict(manifest.metrics)}
    return checkpoint


def _is_reference(path: _PATH) -> bool:
    if not isinstance(path, str) or os.path.exists(path):
        return False
    try:
        parse_ref(path)
    except InvalidRef:
        return False
    return True


class CkptTrackCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that reads and writes the ckpt_track format, never pickles.

    ``load_checkpoint`` accepts any ckpt_track reference (``"local://proj/run@latest"``,
    tracker URLs) or a ckpt_track checkpoint directory, and restores the global RNG states
    saved with it.  With ``fallback`` (what :class:`CkptTrackCallback` installs) every other
    path and every save goes to that IO unchanged; without, ``save_checkpoint`` writes a
    ckpt_track checkpoint directory at the path Lightning gives (``.../epoch=1-step=20.ckpt``).

    >>> trainer = L.Trainer(plugins=[CkptTrackCheckpointIO()])                    # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="local://mnist/run-1@step=300")              # doctest: +SKIP
    """

    def __init__(self, settings: Settings | None = None, *, fallback: CheckpointIO | None = None,
                 restore_rng: bool = True) -> None:
        self.settings = settings
        self.fallback = fallback
        self.restore_rng = restore_rng
        self._warned: set[str] = set()

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # map_location and weights_only concern torch.load; nothing here unpickles and tensors
        # load on the CPU, from where Lightning moves them to the module's device
        if _is_reference(path) or (Path(path) / MANIFEST).is_file():
            return lightning_checkpoint(str(path), settings=self.settings, rng=self.restore_rng)
        if self.fallback is not None:
            return self.fallback.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        raise CheckpointNotFound(
            f"{path} is neither a ckpt_track reference nor a ckpt_track checkpoint directory; "
            "CkptTrackCheckpointIO never unpickles, so load a .ckpt file without this plugin"
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if self.fallback is not None:
            self.fallback.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError("CkptTrackCheckpointIO.save_checkpoint takes no storage_options")
        if "://" in str(path):
            raise ConfigError(f"{path}: CkptTrackCheckpointIO saves to local directories; log to a tracker "
                              "with CkptTrackCallback instead")
        cleaned, notes = _storable_checkpoint(checkpoint, self._warned)
        target = Path(path)
        step, epoch = int(checkpoint.get("global_step", 0)), checkpoint.get("epoch")
        captured = capture(step=step, epoch=epoch, extra={EXTRA_KEY: cleaned, UNSTORED_KEY: notes},
                           model=_Fixed(cleaned["state_dict"]) if "state_dict" in cleaned else None,  # type: ignore[arg-type]
                           optimizer=_optimizer_state(cleaned), scheduler=_scheduler_state(cleaned))
        tensors = snapshot_tensors(captured.tensors, copy=False)
        # written beside the target and swapped in, so an existing one (last.ckpt) is replaced whole;
        # POSIX cannot rename over a non-empty directory, hence the two renames
        tmp_name = f".{target.name}-{uuid.uuid4().hex[:8]}"
        ckpt = write_checkpoint(target.parent, tmp_name, tensors, captured.tree, step=step, epoch=epoch)
        old = target.parent / f".{target.name}-old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.rename(target, old)
        os.rename(ckpt.path, target)
        if old.exists():
            shutil.rmtree(old)

    def remove_checkpoint(self, path: _PATH) -> None:
        if self.fallback is not None and not (Path(path) / MANIFEST).is_file():
            self.fallback.remove_checkpoint(path)
            return
        shutil.rmtree(path, ignore_errors=True)

    def teardown(self) -> None:
        if self.fallback is not None:
            self.fallback.teardown()


def _optimizer_state(checkpoint: Mapping[str, Any]) -> _Fixed | None:
    states = checkpoint.get("optimizer_states") or []
    return _Fixed(states[0]) if len(states) == 1 else None


def _scheduler_state(checkpoint: Mapping[str, Any]) -> _Fixed | None:
    states = checkpoint.get("lr_schedulers") or []
    return _Fixed(states[0]) if len(states) == 1 else None


def resume_ref(ref: str | ct.Ref, *, settings: Settings | None = None) -> str | None:
    """The checkpoint ``ref`` selects as a canonical reference, or None when its run does not
    exist yet or has no checkpoint (a first start): pass it as ``fit(ckpt_path=...)``.

    >>> trainer.fit(model, ckpt_path=resume_ref("local://mnist/run-1"))  # doctest: +SKIP
    """
    parsed = parse_ref(ref)
    try:
        stored = ct.list_checkpoints(parsed, settings)
    except CheckpointNotFound:
        return None
    if not stored:
        return None
    return str(replace(select(stored, parsed).ref, params=parsed.params))  # keeps e.g. ?root=


# -- RNG and data-order state ------------------------------------------------------------
def _rng_now() -> dict[str, Any]:
    captured = capture(step=0, rng=True)
    state: dict[str, Any] = decode_tree(captured.tree["rng"], captured.tensors)
    return state


def _set_rng(state: Mapping[str, Any]) -> None:
    tree, tensors = encode_tree(dict(state), "rng")
    apply({"step": 0, "rng": tree}, tensors, rng=True)


def _generators(loader: Any) -> list[torch.Generator]:
    """The distinct generators a DataLoader draws its order from (loader, sampler, batch sampler's sampler)."""
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    found: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
              getattr(inner, "generator", None)):
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _train_loaders(trainer: pl.Trainer) -> list[Any] | None:
    # Lightning exposes the flattened train loaders only on the fit loop's private CombinedLoader
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return None if combined is None else list(combined.flattened)


def _generator_states(loaders: Iterable[Any]) -> list[list[torch.Tensor]]:
    return [[g.get_state() for g in _generators(loader)] for loader in loaders]


# -- the callback --------------------------------------------------------------------------
class CkptTrackCallback(Callback):
    """Log Lightning checkpoints to ckpt_track; resume from any reference with ``fit(ckpt_path=ref)``.

    ``run``: an existing :class:`ckpt_track.Run`; otherwise one is started on the first
    ``fit`` with ``ct.init(project=, name=, run_id=, backend=, config=, monitor=, mode=,
    resume=, settings=)`` (``config`` defaults to the module's hyper-parameters) and
    finished when ``fit`` ends.  With neither ``every_n_train_steps`` nor
    ``every_n_epochs`` a checkpoint is logged at the end of every epoch.  A step
    checkpoint that falls on the last batch of an epoch is logged at the epoch's end,
    after validation, so that its metrics and resume point include it.

    >>> cb = CkptTrackCallback(project="mnist", every_n_train_steps=100, monitor="val/loss")  # doctest: +SKIP
    >>> L.Trainer(callbacks=[cb]).fit(model)                                               # doctest: +SKIP
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
        resume: ResumeMode = "auto",
        settings: Mapping[str, Any] | None = None,
        blocking: bool | None = None,
        install_checkpoint_io: bool = True,
    ) -> None:
        for label, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label} must be a positive int or None, got {value!r}")
        if run is not None:
            given = {k: v for k, v in (("project", project), ("name", name), ("run_id", run_id), ("backend", backend),
                                       ("config", config), ("settings", settings)) if v is not None}
            if given:
                raise ConfigError(f"pass either run= or ct.init arguments, not both (got {', '.join(given)})")
            if monitor is not None and monitor != run.settings.monitor:
                raise ConfigError(f"monitor={monitor!r} differs from the run's monitor {run.settings.monitor!r}; "
                                  "set it in ct.init(monitor=...)")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if (every_n_epochs or every_n_train_steps) else 1
        self.blocking = blocking
        self.install_checkpoint_io = install_checkpoint_io
        self._run = run
        self._owns_run = run is None
        self._open = False  # an owned run is finished when fit ends; the next fit re-attaches to it
        self._trainer: pl.Trainer | None = None
        self._init_kwargs: dict[str, Any] = {
            k: v for k, v in {"project": project, "name": name, "run_id": run_id, "backend": backend,
                              "config": config, "monitor": monitor, "mode": mode, "settings": settings}.items()
            if v is not None
        }
        self._init_kwargs["resume"] = resume
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
        if self._epoch_complete(trainer):
            self._deferred = True  # the epoch's validation and end hooks still belong to this step
            return
        self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._epoch_complete(trainer):
            return  # stopped mid-epoch (max_steps, early stop): the step checkpoints cover it
        self._epoch_start = {"mode": "pre", "rng": _rng_now(),
                             "generators": _generator_states(_train_loaders(trainer) or [])}
        due = self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if (due or self._deferred) and trainer.global_step != self._last_step:
            self._log(trainer, pl_module)
        self._deferred = False

    @staticmethod
    def _batches_done(trainer: pl.Trainer) -> int:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    @classmethod
    def _epoch_complete(cls, trainer: pl.Trainer) -> bool:
        """Whether every batch of this epoch was drawn (False after a stop by max_steps mid-epoch)."""
        if trainer.num_training_batches == float("inf"):  # iterable data: the epoch ends when it runs dry
            return not (0 <= trainer.max_steps <= trainer.global_step)
        return cls._batches_done(trainer) >= trainer.num_training_batches

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank builds the dict (strategies may gather inside); rank zero records it
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self._last_step = trainer.global_step
        if self._run is None or not trainer.is_global_zero or (self._owns_run and not self._open):
            return
        cleaned, notes = _storable_checkpoint(checkpoint, self._warned)
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
        trainer = self._trainer
        state: dict[str, Any] = {"rng": _rng_now(), "data": None}
        loaders = _train_loaders(trainer) if trainer is not None else None
        if trainer is None or loaders is None:
            return state
        if self._epoch_complete(trainer):  # the next epoch starts from the state of now
            state["data"] = {"mode": "pre", "rng": state["rng"], "generators": _generator_states(loaders), "skip": 0}
        elif self._epoch_start is not None:
            state["data"] = {**self._epoch_start, "skip": self._batches_done(trainer)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        source = checkpoint.get(SOURCE_KEY)
        self._resumed_from = source.get("ref") if isinstance(source, Mapping) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            self._replay_data_order(trainer, self._loaded)
            self._loaded = None
        else:
            # a fresh fit: the first epoch's iterator exists but has drawn nothing yet.  After a resume
            # from a checkpoint without our state the order of this epoch is unknown until it ends.
            loaders = _train_loaders(trainer)
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            fresh = trainer.global_step == 0 and self._batches_done(trainer) == 0
            ok = fresh and loaders is not None and not getattr(fetcher, "batches", None)
            self._epoch_start = ({"mode": "post", "rng": _rng_now(), "generators": _generator_states(loaders or [])}
                                 if ok else None)
        if self._resumed_from is not None and self._run is not None:
            # records the lineage (resumed_from, the tracker's own link); the state is already restored
            try:
                self._run.mark_resumed(self._resumed_from)
            except ct.CkptTrackError as exc:
                log.warning("ckpt_track: could not record that this run resumed from %s: %s", self._resumed_from, exc)
            self._resumed_from = None
        self._last_step = trainer.global_step  # never re-log the checkpoint resumed from

    def _replay_data_order(self, trainer: pl.Trainer, state: Mapping[str, Any]) -> None:
        """Put the train loaders where the checkpoint's epoch had them and skip the batches seen."""
        from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher

        data = state.get("data")
        loaders = _train_loaders(trainer)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if loaders is not None and any(isinstance(loader, _Stateful) for loader in loaders):
            return  # Lightning restores stateful loaders itself
        problem = None
        if data is None:
            problem = "the checkpoint holds no data-order state"
        elif loaders is None or type(fetcher) is not _PrefetchDataFetcher or fetcher.batches:
            problem = "the train dataloader is not a sized, plain one"
        elif [len(_generators(loader)) for loader in loaders] != [len(g) for g in data["generators"]]:
            problem = "the train dataloaders do not match the checkpoint's (number of loaders or generators)"
        if problem is not None:
            self._epoch_start = None
            if data is None or data.get("skip"):
                warnings.warn(f"ckpt_track: resuming mid-epoch, the data order may differ from an uninterrupted "
                              f"run: {problem}", UserWarning, stacklevel=2)
            return
        assert data is not None and loaders is not None and isinstance(fetcher, _PrefetchDataFetcher)
        for loader, states in zip(loaders, data["generators"], strict=True):
            for generator, saved in zip(_generators(loader), states, strict=True):
                generator.set_state(saved)
        _set_rng(data["rng"])
        if data["mode"] == "pre":  # the checkpoint's state precedes the epoch's iterator: make it anew
            iter(fetcher)
        assert fetcher.iterator is not None
        for _ in range(int(data["skip"])):
            next(fetcher.iterator)
        if data["skip"]:
            _set_rng(state["rng"])
            # held until the first batch: Lightning warns in between, wrongly now
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE)
        self._epoch_start = {k: data[k] for k in ("mode", "rng", "generators")}


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
