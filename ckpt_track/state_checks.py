"""Does a checkpoint's state fit the live objects?  Checked before anything is changed.

A restore is all or nothing (:mod:`ckpt_track.restoring`), so every way a saved state can
fail to load is looked for here first: model keys and shapes, optimizer parameter groups
and hyper-parameters, scheduler and scaler keys and value types.  Each error names the
offending keys, so a user can tell a wrong checkpoint from a damaged one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import IntegrityError, StateMismatch

__all__ = ["check_like", "check_model", "check_optimizer_groups", "check_optimizer_values", "mismatch"]

_MAX_NAMES = 10

#: optimizer flags a checkpoint of an older torch may lack (the optimizer fills in defaults)
_OPTIONAL_FLAGS = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"})


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model(current: Mapping[str, Any], saved: Mapping[str, Any], strict: bool) -> None:
    """Raise :class:`StateMismatch` when the saved state dict does not fit the model's: shapes
    always, missing and unexpected keys with ``strict``."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in set(current) & set(saved)
        if isinstance(saved[k], torch.Tensor) and isinstance(current[k], torch.Tensor) and saved[k].shape != current[k].shape
    )
    problems = []
    if strict and missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if strict and unexpected:
        problems.append(f"not in the model: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes)}")
    if problems:
        hint = " (pass strict=False to ignore missing/unexpected keys)" if not shapes else ""
        raise StateMismatch("model state does not match the checkpoint; " + "; ".join(problems) + hint)


def check_optimizer_groups(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """The saved parameter groups have the sizes of the optimizer's (needs no tensor data)."""
    try:
        saved_groups = [len(g["params"]) for g in saved["param_groups"]]
    except (TypeError, KeyError) as exc:
        raise StateMismatch(f"the checkpoint's optimizer state is malformed: {exc}") from exc
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved_groups != groups:
        raise StateMismatch(
            f"optimizer state does not fit this optimizer: the checkpoint has parameter groups of sizes "
            f"{saved_groups}, the optimizer {groups}"
        )


def mismatch(saved: Any, live: Any) -> str | None:
    """Why a saved value cannot replace a live one of the same slot (None when it can):
    numbers stay numbers, bools bools, strings strings, tuples and lists keep their length."""
    if isinstance(live, torch.Tensor):
        if isinstance(saved, torch.Tensor):
            return None if saved.shape == live.shape else f"a tensor of shape {tuple(saved.shape)}, " \
                f"expected {tuple(live.shape)}"
        return None if _is_number(saved) else "expected a tensor or a number"
    if isinstance(live, bool):
        return None if isinstance(saved, bool) or saved is None else "expected true or false"
    if _is_number(live):
        return None if _is_number(saved) else "expected a number"
    if isinstance(live, str):
        return None if isinstance(saved, str) else "expected a string"
    if isinstance(live, (tuple, list)):
        if type(saved) is not type(live) or len(saved) != len(live):
            return f"expected a {type(live).__name__} of {len(live)} values"
        return next((f"item {i}: {p}" for i, (a, b) in enumerate(zip(saved, live)) if (p := mismatch(a, b))), None)
    if isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            return "expected an object"
        return next((f"{k!r}: {p}" for k in live if k in saved and (p := mismatch(saved[k], live[k]))), None)
    return None  # None or a type we cannot judge: the live object decides


def _public(keys: Any) -> set[Any]:
    """Keys that say what an object is (private bookkeeping keys come and go with torch versions)."""
    return {k for k in keys if not (isinstance(k, str) and (k.startswith("_") or k == "verbose"))}


def check_like(saved: Any, live: Mapping[str, Any], what: str, *, same_keys: bool) -> None:
    """``saved`` must have the live state's keys (exactly, with ``same_keys``, apart from
    private bookkeeping keys) with values of compatible types."""
    if not isinstance(saved, Mapping):
        raise StateMismatch(f"the checkpoint's {what} state is a {type(saved).__name__}, not an object")
    missing = sorted(map(str, (_public(live) if same_keys else set(live)) - set(saved)))
    unknown = sorted(map(str, _public(saved) - set(live))) if same_keys else []
    if missing or unknown:
        raise StateMismatch(
            f"the checkpoint's {what} state does not fit this {what} (saved from another class?): "
            + "; ".join(p for p in (missing and f"missing {_names(missing)}", unknown and f"unknown {_names(unknown)}")
                        if p)
        )
    for key in live:
        if key in saved and (problem := mismatch(saved[key], live[key])):
            raise StateMismatch(f"the checkpoint's {what} state has {key!r} = {_short(saved[key])}: {problem}")


def check_optimizer_values(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Every hyper-parameter of every live group is in the saved group with a compatible type."""
    if not isinstance(saved.get("state"), Mapping):
        raise IntegrityError("state.json: the optimizer state has no 'state' object; the checkpoint is damaged")
    for i, (live, group) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        if not isinstance(group, Mapping) or not all(isinstance(p, int) and not isinstance(p, bool)
                                                     for p in group["params"]):
            raise IntegrityError(f"state.json: optimizer parameter group {i} is malformed; the checkpoint is damaged")
        for key, value in live.items():
            if key == "params":
                continue
            if key not in group:
                if key in _OPTIONAL_FLAGS and (value is None or isinstance(value, bool)):
                    continue
                raise StateMismatch(f"optimizer parameter group {i} of the checkpoint lacks {key!r}; it was saved "
                                    f"from another optimizer class (this one is {type(optimizer).__name__})")
            problem = mismatch(group[key], value)
            if problem:
                raise StateMismatch(f"optimizer parameter group {i} of the checkpoint has {key!r} = "
                                    f"{_short(group[key])}: {problem}")
