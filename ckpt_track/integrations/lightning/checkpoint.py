"""Lightning's checkpoint dict and ckpt_track's format, both ways.

Saving: the dict Lightning builds may hold values the JSON codec cannot store (a module or
a path among the hyper-parameters, anything an ``on_save_checkpoint`` hook adds); they are
replaced, never fatal, so that training goes on.  Loading: a stored version becomes the dict
Lightning restores from again, whether it was logged by the callback (the whole dict is in
``extra["lightning"]``) or outside Lightning (weights, optimizer, scheduler only).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl

import ckpt_track as ct

__all__ = ["EXTRA_KEY", "SOURCE_KEY", "UNSTORED_KEY", "StateOf", "is_reference", "lightning_checkpoint", "optimizer_state",
           "resume_ref", "scheduler_state", "storable_checkpoint"]

EXTRA_KEY = "lightning"
UNSTORED_KEY = "lightning_unstored"
SOURCE_KEY = "ckpt_track"  # added to a loaded Lightning dict: which checkpoint it came from
_HPARAM_KEYS = frozenset({
    pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, pl.LightningModule.CHECKPOINT_HYPER_PARAMS_TYPE,
    pl.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY, pl.LightningDataModule.CHECKPOINT_HYPER_PARAMS_TYPE,
})
_DROP = object()


# -- saving: Lightning's dict made storable ------------------------------------------------------
def _clean(obj: Any, path: str, stringify: bool, notes: list[str]) -> Any:
    """``obj`` with every value the codec rejects replaced: by its repr when ``stringify``, else dropped
    (``_DROP``; inside a list or tuple ``None``, so positions keep their meaning)."""
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            where = f"{path}/{key}"
            if not (isinstance(key, str) or ct.is_storable(key)):
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
    if ct.is_storable(obj):
        return obj
    if stringify:
        notes.append(f"{path}: stored as its repr (a {type(obj).__qualname__})")
        return repr(obj)
    notes.append(f"{path}: left out (a {type(obj).__qualname__} cannot be stored)")
    return _DROP


def storable_checkpoint(checkpoint: Mapping[str, Any], warned: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Lightning's dict made storable, and notes on what was changed (each warned about once)."""
    notes: list[str] = []
    cleaned = _clean(checkpoint, "", False, notes)
    new = [n for n in notes if n not in warned]
    if new:
        warned.update(new)
        warnings.warn("ckpt_track: parts of the Lightning checkpoint are not JSON or tensors: " + "; ".join(new),
                      UserWarning, stacklevel=4)
    return cleaned, notes


class StateOf:
    """Hands a ready state dict to ckpt_track, which asks objects for ``state_dict()``."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state


def optimizer_state(checkpoint: Mapping[str, Any]) -> StateOf | None:
    """The only optimizer's state (ckpt_track's standard entry holds one optimizer)."""
    states = checkpoint.get("optimizer_states") or []
    return StateOf(states[0]) if len(states) == 1 else None


def scheduler_state(checkpoint: Mapping[str, Any]) -> StateOf | None:
    """The only LR scheduler's state."""
    states = checkpoint.get("lr_schedulers") or []
    return StateOf(states[0]) if len(states) == 1 else None


# -- loading: a stored version as Lightning's dict ------------------------------------------------
def _rebuild(state: ct.CheckpointState) -> dict[str, Any]:
    if EXTRA_KEY in state.extra:
        checkpoint: dict[str, Any] = state.extra[EXTRA_KEY]
        dropped = [n for n in state.extra.get(UNSTORED_KEY) or [] if "left out" in n]
        if dropped:
            warnings.warn("ckpt_track: this checkpoint was saved without " + "; ".join(dropped), UserWarning,
                          stacklevel=4)
        return checkpoint
    # logged outside Lightning: weights, optimizer and scheduler, but no loop progress
    checkpoint = {"epoch": state.epoch or 0, "global_step": state.step, "pytorch-lightning_version": pl.__version__}
    if state.model is not None:
        checkpoint["state_dict"] = state.model
    if state.optimizer is not None:
        checkpoint["optimizer_states"] = [state.optimizer]
    if state.scheduler is not None:
        checkpoint["lr_schedulers"] = [state.scheduler]
    return checkpoint


def lightning_checkpoint(ref: str | os.PathLike[str], *, settings: ct.Settings | None = None,
                         rng: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint dict a ckpt_track reference (or a checkpoint directory) holds.

    Verified before anything is read; tensors come from safetensors, the rest from JSON.
    ``rng=True`` also restores the global RNG states saved with it.  The dict gets a
    ``"ckpt_track"`` entry naming its source (``ref``, ``step``, ``metrics``).

    >>> ckpt = lightning_checkpoint("local://mnist/run-1@best")  # doctest: +SKIP
    >>> model.load_state_dict(ckpt["state_dict"])                # doctest: +SKIP
    """
    found = ct.fetch_checkpoint(ref, settings=settings)
    state = found.read()
    checkpoint = _rebuild(state)
    if rng and state.rng is not None:
        ct.apply_rng(state.rng)
    checkpoint[SOURCE_KEY] = {"ref": found.ref, "path": str(found.path), "step": state.step,
                              "metrics": dict(state.metrics)}
    return checkpoint


def resume_ref(ref: str | ct.Ref, *, settings: ct.Settings | None = None) -> str | None:
    """The checkpoint ``ref`` selects as a canonical reference, or None when its run does not
    exist yet or has no checkpoint (a first start): pass it as ``fit(ckpt_path=...)``.

    >>> trainer.fit(model, ckpt_path=resume_ref("local://mnist/run-1"))  # doctest: +SKIP
    """
    parsed = ct.parse_ref(ref)
    found = ct.find_checkpoint(parsed, settings)
    return None if found is None else str(replace(found.ref, params=parsed.params))  # keeps e.g. ?root=


def is_reference(path: Any) -> bool:
    """Whether Lightning's ``ckpt_path`` is a ckpt_track reference rather than a file."""
    if not isinstance(path, str) or os.path.exists(path):
        return False
    try:
        ct.parse_ref(path)
    except ct.InvalidRef:
        return False
    return True
