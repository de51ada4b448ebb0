"""The data order inside an epoch: what it takes to resume mid-epoch bit-identically.

Lightning resumes mid-epoch exactly only from dataloaders that have ``state_dict``; a plain
``DataLoader(shuffle=True, generator=g)`` would replay a different order.  So the callback
keeps, in its own callback state, the train dataloaders' ``torch.Generator`` states and the
global RNG at the start of the current epoch, plus how many batches were drawn; on resume
:func:`replay` puts the generators back, makes the epoch's iterator again (the same shuffle)
and skips the batches already seen.  The one step Lightning has no public API for, drawing
from the fit loop's iterator, goes through :mod:`._compat`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader

import ckpt_track as ct
from ckpt_track.integrations.lightning import _compat

__all__ = ["batches_done", "callback_state", "epoch_complete", "epoch_start", "fresh_epoch_start", "generators",
           "quiet_not_resumable", "replay", "train_loaders"]


def generators(loader: Any) -> list[torch.Generator]:
    """The distinct generators a DataLoader draws its order from (loader, sampler, batch sampler's sampler)."""
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    found: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
              getattr(inner, "generator", None)):
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def train_loaders(trainer: pl.Trainer) -> list[Any] | None:
    """The fit loop's train dataloaders, flattened as Lightning iterates them (None before set-up)."""
    loaders = trainer.train_dataloader
    return None if loaders is None else list(CombinedLoader(loaders).flattened)


def _generator_states(loaders: Iterable[Any]) -> list[list[torch.Tensor]]:
    return [[g.get_state() for g in generators(loader)] for loader in loaders]


def _stateful(loader: Any) -> bool:
    """Whether Lightning saves and restores the loader itself (it has ``state_dict``/``load_state_dict``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def batches_done(trainer: pl.Trainer) -> int:
    """Train batches drawn in the current epoch."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def epoch_complete(trainer: pl.Trainer) -> bool:
    """Whether every batch of this epoch was drawn (False after a stop by max_steps mid-epoch)."""
    if trainer.num_training_batches == float("inf"):  # iterable data: the epoch ends when it runs dry
        return not (0 <= trainer.max_steps <= trainer.global_step)
    return batches_done(trainer) >= trainer.num_training_batches


def epoch_start(mode: str, loaders: Iterable[Any]) -> dict[str, Any]:
    """The record of the data order now: ``mode`` ``"pre"`` when the next epoch's iterator is not
    made yet (its shuffle is still to be drawn), ``"post"`` when it was made from this state."""
    return {"mode": mode, "rng": ct.capture_rng(), "generators": _generator_states(loaders)}


def fresh_epoch_start(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The record at the start of a fresh fit, whose first epoch's iterator exists but has drawn
    nothing yet; None after a resume from a checkpoint without our state (the order of this
    epoch is unknown until it ends)."""
    loaders = train_loaders(trainer)
    fresh = trainer.global_step == 0 and batches_done(trainer) == 0
    if not fresh or loaders is None or _compat.prefetched(trainer):
        return None
    return epoch_start("post", loaders)


def callback_state(trainer: pl.Trainer | None, started: Mapping[str, Any] | None) -> dict[str, Any]:
    """The callback's checkpoint state: the RNG now and the data order to replay from."""
    state: dict[str, Any] = {"rng": ct.capture_rng(), "data": None}
    loaders = train_loaders(trainer) if trainer is not None else None
    if trainer is None or loaders is None:
        return state
    if epoch_complete(trainer):  # the next epoch starts from the state of now
        state["data"] = {"mode": "pre", "rng": state["rng"], "generators": _generator_states(loaders), "skip": 0}
    elif started is not None:
        state["data"] = {**started, "skip": batches_done(trainer)}
    return state


def _problem(data: Any, loaders: list[Any] | None, fetcher: Any) -> str | None:
    if data is None:
        return "the checkpoint holds no data-order state"
    if loaders is None or fetcher is None or fetcher.batches:
        return "the train dataloader is not a sized, plain one"
    if [len(generators(loader)) for loader in loaders] != [len(g) for g in data["generators"]]:
        return "the train dataloaders do not match the checkpoint's (number of loaders or generators)"
    return None


def replay(trainer: pl.Trainer, state: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """Put the train loaders where the checkpoint's epoch had them and skip the batches seen.

    Returns the record of this epoch's start to keep, and whether batches were skipped (then
    Lightning's warning that the loader cannot resume mid-epoch is wrong: see
    :func:`quiet_not_resumable`).
    """
    data = state.get("data")
    loaders = train_loaders(trainer)
    if loaders is not None and any(_stateful(loader) for loader in loaders):
        return None, False  # Lightning restores stateful loaders itself
    fetcher = _compat.plain_fetcher(trainer)
    problem = _problem(data, loaders, fetcher)
    if problem is not None:
        if data is None or data.get("skip"):
            warnings.warn(f"ckpt_track: resuming mid-epoch, the data order may differ from an uninterrupted "
                          f"run: {problem}", UserWarning, stacklevel=3)
        return None, False
    assert data is not None and loaders is not None
    for loader, states in zip(loaders, data["generators"], strict=True):
        for generator, saved in zip(generators(loader), states, strict=True):
            generator.set_state(saved)
    ct.apply_rng(data["rng"])
    if data["mode"] == "pre":  # the checkpoint's state precedes the epoch's iterator: make it anew
        _compat.restart_epoch(fetcher)
    _compat.skip_batches(fetcher, int(data["skip"]))
    if data["skip"]:
        ct.apply_rng(state["rng"])
    return {k: data[k] for k in ("mode", "rng", "generators")}, bool(data["skip"])


def quiet_not_resumable() -> warnings.catch_warnings:  # type: ignore[type-arg]
    """An entered filter for Lightning's mid-epoch warning, to exit at the first batch (it is
    given in between, and after a replay it is wrong)."""
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message=_compat.NOT_RESUMABLE)
    return quiet
