"""Hugging Face ``transformers.Trainer`` integration.

>>> from ckpt_track.integrations.transformers import CkptTrackCallback
>>> callback = CkptTrackCallback(project="gpt2-tiny")                       # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])  # doctest: +SKIP
>>> trainer.train()                                                          # doctest: +SKIP
>>> path = callback.checkpoint_dir("local://gpt2-tiny/3k2j1x@best")          # doctest: +SKIP
>>> trainer.train(resume_from_checkpoint=str(path))                          # doctest: +SKIP

:class:`CkptTrackCallback` records every checkpoint the Trainer saves (``on_save``)
as a ckpt_track checkpoint of the configured backend, at ``state.global_step``,
with the metrics the Trainer logged at that step (``loss``, ``eval_loss``, ...).
The ``best`` alias follows the metric the Trainer itself tracks
(``metric_for_best_model``, ``eval_loss`` by default; ``greater_is_better`` gives the mode).

Design: what is stored, and why not the Trainer's own directory
----------------------------------------------------------------
A Trainer checkpoint directory holds ``model.safetensors`` and ``trainer_state.json``
but also ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``training_args.bin``,
which are pickles.  ckpt_track promises that loading a checkpoint never unpickles,
so uploading that directory as it is would break the promise for every user who
restores it.  Instead the callback captures the live objects the Trainer hands to
callbacks (``model``, ``optimizer``, ``lr_scheduler``) and the RNG states into the
ckpt_track format (safetensors + JSON), and keeps the Trainer's ``trainer_state.json``
and the model's ``config.json`` as JSON in ``extra["transformers"]``.  Such a
checkpoint restores with ``ct.restore(ref, model=..., optimizer=...)`` like any other,
is verified by hash before anything is read, and is deduplicated and retained by the
core like any other.

The reverse is :func:`checkpoint_dir`: it turns any reference into a local directory in
exactly the layout the installed Trainer reads back (``_load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_rng_state``, ``TrainerState.load_from_json``).
The pickled files in it are written with ``torch.save`` for the Trainer, which loads
them itself (with ``weights_only=True``); ckpt_track never reads them.  Resuming through
that directory is bit-identical to an uninterrupted run (tested), mid-epoch included.
Nothing here calls a private transformers API; the layout those private loaders read (file
names, the RNG file's keys) is checked against the installed transformers by
``tests/e2e/test_integration_transformers.py``, so a change there fails a test, not a resume.

Limits: only the world-process-zero state is recorded (single-process training; the
Trainer's per-rank RNG files of distributed runs are not reproduced), the mixed-precision
``GradScaler`` is not reachable from a callback and so not stored, and DeepSpeed/FSDP
sharded states are not supported.  With ``save_only_model=True`` the Trainer skips its
optimizer, scheduler and RNG pickles (it still writes the weights and ``training_args.bin``)
while ckpt_track records the full state; with ``CkptTrackCallback(trainer_checkpoints=False)``
the Trainer writes no checkpoint directory at all and only ckpt_track's format is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import ckpt_track as ct
from ckpt_track import ResumeMode
from ckpt_track.integrations.trainer_dir import EXTRA_KEY, SOURCE_FILE, checkpoint_dir

__all__ = ["CkptTrackCallback", "checkpoint_dir"]


def _tracked_metric(args: TrainingArguments) -> tuple[str, str]:
    """The metric name (as logged) and mode the Trainer uses to pick its best checkpoint."""
    metric = args.metric_for_best_model or "loss"
    if not metric.startswith("eval_"):  # the Trainer prefixes it the same way
        metric = f"eval_{metric}"
    return metric, "max" if args.greater_is_better else "min"


def _metrics_at(log_history: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """Numbers the Trainer logged at ``step``; older values are left out so that ``best``
    never judges a checkpoint by an evaluation of an earlier one."""
    out: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    return out


def _model_config(model: torch.nn.Module | None) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return json.loads(config.to_json_string(use_diff=True))


class CkptTrackCallback(TrainerCallback):
    """Log each checkpoint the Trainer saves to ckpt_track, with its metrics and step.

    Without ``run`` the callback starts a run when training begins (``ct.init`` with the
    keywords given here; the run name defaults to ``args.run_name``) and finishes it when
    training ends; ``cb.run`` is that :class:`ckpt_track.Run` (None before training), still
    readable afterwards (``cb.run.ref``, ``cb.run.id`` to continue it by ``run_id=``).  With
    ``run`` it logs into that run and leaves finishing it to you; ``best`` then follows that
    run's ``monitor``.  ``cb.handles`` holds one :class:`ckpt_track.CheckpointHandle` per save.

    ``best`` follows an evaluation metric (``metric_for_best_model``, ``eval_loss`` by
    default), so it needs evaluation configured (``eval_strategy`` matching ``save_strategy``
    and an ``eval_dataset``); asked for a best evaluation metric with ``eval_strategy="no"``,
    the callback warns once when training begins.  ``monitor="loss"`` follows the training loss.

    ``trainer_checkpoints=False`` keeps only ckpt_track's format: the Trainer writes no
    ``checkpoint-N`` directories (no ``optimizer.pt``, ``rng_state.pth``, ``training_args.bin``
    pickles, no second copy of the weights).  At each save the Trainer schedules
    (``save_steps``/``save_strategy``), the callback records the checkpoint itself, once that
    step's logs and evaluation are in, and clears ``control.should_save``; so the Trainer's
    ``on_save`` event does not fire.  A save another callback forces anyway is recorded and its
    directory removed once committed.  :meth:`checkpoint_dir` then writes the directory a
    resumed Trainer reads in the cache and removes it once the Trainer has loaded it.  Not with
    ``save_strategy="best"`` or ``load_best_model_at_end`` (they need the Trainer's own
    directories): restore ``f"{cb.run.ref}@best"`` with ``ct.restore`` instead.

    >>> trainer = Trainer(..., callbacks=[CkptTrackCallback(project="bert-tiny")])  # doctest: +SKIP
    >>> cb = CkptTrackCallback(project="bert-tiny", trainer_checkpoints=False)      # doctest: +SKIP
    """

    def __init__(
        self,
        run: ct.Run | None = None,
        *,
        project: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
        backend: str | Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        resume: ResumeMode = "auto",
        trainer_checkpoints: bool = True,
    ) -> None:
        given = {k: v for k, v in {"project": project, "name": name, "run_id": run_id, "backend": backend,
                                   "settings": settings, "monitor": monitor, "mode": mode}.items() if v is not None}
        if run is not None and given:
            raise ct.ConfigError(f"pass either run= or the keywords to start one ({', '.join(given)}), not both")
        self.run: ct.Run | None = run
        self.handles: list[ct.CheckpointHandle] = []
        self._owns_run = run is None
        self._live = run is not None  # False once the run this callback started is finished
        self._init: dict[str, Any] = {"project": project, "name": name, "run_id": run_id, "backend": backend,
                                      "resume": resume}
        self._settings = dict(settings or {})
        self._monitor, self._mode = monitor, mode
        self._resumed_from: str | None = None
        self.trainer_checkpoints = trainer_checkpoints
        self._pending = False  # a save the Trainer scheduled and this callback took over
        self._last_logged = -1  # the last step the Trainer logged its training loss at
        self._recorded: int | None = None  # the step of the last checkpoint recorded
        self._resume_dir: Path | None = None  # made by checkpoint_dir; removed once the Trainer read it
        self._warned = False

    # -- the run -----------------------------------------------------------------------
    def settings(self) -> ct.Settings:
        """The settings this callback's run uses (to resolve references the same way)."""
        if self.run is not None:
            return self.run.settings
        overrides = {**self._settings, "project": self._init["project"], "backend": self._init["backend"]}
        return ct.load_settings({k: v for k, v in overrides.items() if v is not None})

    def _ensure_run(self, args: TrainingArguments, state: TrainerState) -> ct.Run | None:
        if not state.is_world_process_zero:
            return None  # one process records; the others hold the same replicated state
        if self.run is not None and self._live:
            return self.run
        monitor, mode = _tracked_metric(args)
        self.run = ct.init(
            project=self._init["project"],
            name=self._init["name"] or args.run_name or None,
            run_id=self._init["run_id"],
            backend=self._init["backend"],
            config=args.to_dict(),
            monitor=self._monitor or monitor,
            mode=self._mode or mode,
            resume=self._init["resume"],
            # the world process zero records the replicated state: a single-process run there,
            # so ct.init does not wait for the other ranks to join a collective one
            settings={"distributed": "off", **self._settings},
        )
        self._live = True
        return self.run

    def checkpoint_dir(self, ref: str | ct.Ref, dest: str | os.PathLike[str] | None = None) -> Path:
        """:func:`checkpoint_dir` with this callback's settings; the next run records that it
        resumed from ``ref`` (its lineage and, where the tracker has one, its input graph).

        >>> path = callback.checkpoint_dir("mlflow://<run_id>@latest")  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=str(path))             # doctest: +SKIP
        """
        if dest is None and not self.trainer_checkpoints:
            # a directory of its own, removed once the Trainer has loaded it: no pickle stays
            self._resume_dir = ct.cache_dir() / EXTRA_KEY / "resume" / uuid.uuid4().hex
            dest = self._resume_dir / "checkpoint"
        path = checkpoint_dir(ref, dest, settings=self.settings())
        self._resumed_from = json.loads((path / SOURCE_FILE).read_text())["ref"]
        return path

    def _remove_resume_dir(self) -> None:
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

    # -- Trainer events ----------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if not self.trainer_checkpoints:
            _check_without_trainer_checkpoints(args)
        self._pending, self._recorded, self._last_logged = False, None, state.global_step
        run = self._ensure_run(args, state)
        if run is not None:
            self._warn_if_best_cannot_be_judged(args, run)
        if run is not None and self._resumed_from is not None:
            # nothing is applied here (the Trainer loads the directory itself): this only
            # records resumed-from in the run's lineage and the tracker's input graph
            run.mark_resumed(self._resumed_from)
            self._resumed_from = None

    def _warn_if_best_cannot_be_judged(self, args: TrainingArguments, run: ct.Run) -> None:
        asked = self._monitor is not None or args.metric_for_best_model is not None or not self._owns_run
        metric = run.settings.monitor or ""  # None: ct.init(monitor=None), nothing decides best
        if self._warned or not asked or not metric.startswith("eval_") or args.eval_strategy != "no":
            return
        self._warned = True
        warnings.warn(
            f"ckpt_track: `best` follows {metric!r}, an evaluation metric, but the Trainer never evaluates "
            "(eval_strategy='no'), so no checkpoint becomes `best`; set eval_strategy (and eval_steps) like "
            "save_strategy and give an eval_dataset, or follow the training loss with monitor='loss'",
            UserWarning, stacklevel=2)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._remove_resume_dir()  # the Trainer has read it all (weights, optimizer, RNG) by now

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._take_over_save(args, state, control, kwargs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._take_over_save(args, state, control, kwargs)

    def _take_over_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                        kwargs: dict[str, Any]) -> None:
        """Without Trainer checkpoints: turn the save the Trainer just scheduled into ours.  It is
        recorded at the last event before the Trainer would have saved: after the evaluation when
        one is due, else after the training log when one is due, else now."""
        if self.trainer_checkpoints or not control.should_save:
            return
        control.should_save, self._pending = False, True
        logs_due = control.should_log and state.global_step > self._last_logged
        if not control.should_evaluate and not logs_due:
            self._record_pending(args, state, control, kwargs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            self._last_logged = state.global_step
        if not control.should_evaluate:  # an evaluation due at this step logs (and records) later
            self._record_pending(args, state, control, kwargs)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._record_pending(args, state, control, kwargs, metrics)

    def _record_pending(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                        kwargs: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> None:
        if not self._pending:
            return
        self._pending = False
        saved = _trainer_state_at_save(args, state, control, metrics)
        self._record(args, state, kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler"), saved)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                lr_scheduler: Any = None, **kwargs: Any) -> None:
        handle = self._record(args, state, model, optimizer, lr_scheduler, dataclasses.asdict(state))
        if handle is None and self.handles and self.handles[-1].step == state.global_step:
            handle = self.handles[-1]  # this step was recorded already (taken over earlier)
        if handle is not None and not self.trainer_checkpoints:
            # a save another callback forced: ours is committed, so the Trainer's copy can go
            handle.committed()
            shutil.rmtree(Path(args.output_dir) / f"checkpoint-{state.global_step}", ignore_errors=True)

    def _record(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module | None,
                optimizer: torch.optim.Optimizer | None, lr_scheduler: Any,
                trainer_state: dict[str, Any]) -> ct.CheckpointHandle | None:
        run = self._ensure_run(args, state)
        if run is None or self._recorded == state.global_step:
            return None
        self._recorded = state.global_step
        extra: dict[str, Any] = {"trainer_state": trainer_state, "version": transformers.__version__}
        config = _model_config(model)
        if config is not None:
            extra["model_config"] = config
        handle = run.log_checkpoint(
            state.global_step,
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            metrics=_metrics_at(state.log_history, state.global_step),
            epoch=None if state.epoch is None else int(state.epoch),
            extra={EXTRA_KEY: extra},
        )
        self.handles.append(handle)
        return handle

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._record_pending(args, state, control, kwargs)
        self._remove_resume_dir()
        if self.run is None or not self._live:
            return
        if self._owns_run:
            self._live = False  # a later train() starts (or, by name, continues) a run again
            self.run.finish()  # waits for the background saves
        else:
            self.run.wait()


def _check_without_trainer_checkpoints(args: TrainingArguments) -> None:
    for option, on in (("save_strategy='best'", args.save_strategy == "best"),
                       ("load_best_model_at_end=True", args.load_best_model_at_end)):
        if on:
            raise ct.ConfigError(
                f"CkptTrackCallback(trainer_checkpoints=False) cannot serve {option}: it needs the Trainer's own "
                "checkpoint directories; use save_strategy='steps' or 'epoch' and, after training, "
                "ct.restore(f'{callback.run.ref}@best', model=trainer.model)")


def _trainer_state_at_save(args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``state`` as the Trainer's own save would write it at this step: after its update of the
    best metric from ``metrics`` (it makes it after the evaluation callbacks ran) and with the
    control state it records (``restore_callback_states_from_checkpoint``)."""
    saved = dataclasses.asdict(state)
    name = args.metric_for_best_model
    if metrics is not None and name is not None:
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        best = saved["best_metric"]
        if isinstance(value, (int, float)) and (
                best is None or (value > best if args.greater_is_better else value < best)):
            saved["best_metric"] = value
            if args.save_strategy in ("steps", "epoch"):
                saved["best_global_step"] = state.global_step
    callbacks = saved.get("stateful_callbacks")
    if isinstance(callbacks, dict) and "TrainerControl" in callbacks:
        recorded = control.state()
        recorded["args"]["should_save"] = True  # as the Trainer's save records it
        callbacks["TrainerControl"] = recorded
    return saved
