"""Capture training state into (tensors, JSON tree) and apply it back.

:func:`capture` asks the training objects for their state dicts (and the global RNG
states) and splits them with one codec (:mod:`ckpt_track.state_codec`) into named tensors
for safetensors and a JSON tree.  :func:`apply` puts a stored state back, but only after
:func:`prepare` decoded and checked all of it (:mod:`ckpt_track.state_checks`,
:mod:`ckpt_track.state_rng`): a checkpoint that does not fit changes nothing.

The codec and RNG names (``encode_tree``, ``decode_tree``, ``capture_rng``,
``apply_rng``, ``check_rng``) are importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import IntegrityError, SerializationError, StateMismatch
from .state_checks import check_like, check_model, check_optimizer_groups, check_optimizer_values
from .state_codec import Encoder, decode_tree, encode_tree, is_storable, tensor_name
from .state_rng import apply_rng, capture_rng, check_rng, set_rng

__all__ = ["Captured", "Restored", "apply", "apply_rng", "capture", "capture_rng", "check", "check_count",
           "check_rng", "decode_parts", "decode_tree", "encode_parts", "encode_tree", "is_storable", "live_tensors",
           "prepare", "training_parts"]


# -- capture ---------------------------------------------------------------------
@dataclass
class Captured:
    """Training state split into a JSON tree and named tensors (still aliasing the live ones)."""

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def capture(
    *,
    step: int,
    epoch: int | None = None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> Captured:
    """Collect the state of the given training objects.

    Raises :class:`SerializationError` at once for anything that cannot be stored.

    >>> c = capture(step=3, model=torch.nn.Linear(2, 1), rng=False)
    >>> sorted(c.tensors)
    ['model/bias', 'model/weight']
    """
    parts: dict[str, Any] = {"step": int(step), "epoch": epoch}
    if model is not None:
        parts["model"] = model.state_dict()
    if optimizer is not None:
        parts["optimizer"] = optimizer.state_dict()
    parts.update(training_parts(scheduler=scheduler, scaler=scaler, extra=extra))
    if rng:
        parts["rng"] = capture_rng()
    enc = Encoder()
    tree = encode_parts(parts, enc)
    return Captured(tree, enc.tensors)


def training_parts(*, scheduler: Any = None, scaler: Any = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The scheduler's and scaler's state dicts and ``extra`` (checked: a dict with str keys),
    for those given."""
    parts: dict[str, Any] = {}
    if scheduler is not None:
        parts["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        parts["scaler"] = scaler.state_dict()
    if extra is not None:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise SerializationError("extra must be a dict with str keys")
        parts["extra"] = dict(extra)
    return parts


def encode_parts(parts: Mapping[str, Any], enc: Encoder) -> dict[str, Any]:
    """The JSON tree of a checkpoint's parts, their tensors collected in ``enc``; model keys
    stay flat and readable (``model/<state_dict key>``)."""
    tree: dict[str, Any] = {}
    for key, value in parts.items():
        if key == "model":
            tree[key] = {k: enc.tensor(v, f"model/{k}") if isinstance(v, torch.Tensor) else enc.encode(v, f"model/{k}")
                         for k, v in value.items()}
        else:
            tree[key] = enc.encode(value, key)
    return tree


# -- apply -----------------------------------------------------------------------
@dataclass(frozen=True)
class Restored:
    """What a restore put back, plus what the caller needs to continue."""

    step: int
    epoch: int | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    ref: str | None = None


def _load_model(model: torch.nn.Module, saved: Mapping[str, Any], strict: bool) -> None:
    current = model.state_dict()
    check_model(current, saved, strict)
    # a tensor that was read straight into the model's own memory needs no copy, unless its
    # module has its own loading logic (a custom _load_from_state_dict or a pre-hook)
    plain = _plain_keys(model)
    model.load_state_dict({k: v for k, v in saved.items()
                           if k in current and not (k in plain and _same(v, current[k]))}, strict=False)


def _plain_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys whose owning module loads them with nn.Module's default logic."""
    keys: set[str] = set()
    default = torch.nn.Module._load_from_state_dict
    for prefix, module in model.named_modules():
        if getattr(type(module)._load_from_state_dict, "__func__", type(module)._load_from_state_dict) is not default \
                or module._load_state_dict_pre_hooks:
            continue
        head = f"{prefix}." if prefix else ""
        keys.update(head + n for n, _ in module.named_parameters(recurse=False))
        keys.update(head + n for n, _ in module.named_buffers(recurse=False))
    return keys


def _same(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device == b.device
            and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def check(
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    strict: bool = True,
) -> None:
    """Raise :class:`StateMismatch` if the checkpoint does not fit the objects; changes nothing.
    ``tensors`` may be meta tensors (only names, shapes and dtypes are looked at)."""
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name not in tree:
            raise StateMismatch(f"the checkpoint holds no {name} state (it was saved without {name}=...)")
    if optimizer is not None:
        check_optimizer_groups(optimizer, _decode(tree["optimizer"], tensors, "optimizer"))
    if model is not None:
        check_model(model.state_dict(), _decode(tree["model"], tensors, "model"), strict)


def live_tensors(*, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, scaler: Any = None) -> dict[str, torch.Tensor]:
    """The objects' own tensors under the names a checkpoint of them uses (memory to restore into)."""
    try:
        return capture(step=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       rng=False).tensors
    except SerializationError:
        return {}


def apply(
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: bool = True,
    strict: bool = True,
) -> Restored:
    """Load captured state into live training objects.

    Everything is checked first (:func:`prepare`): raises :class:`StateMismatch` naming
    the offending keys when the checkpoint does not fit, :class:`IntegrityError` when a
    value is malformed; in both cases no object is changed.
    """
    parts = prepare(tree, tensors, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    strict=strict, rng=rng)
    if model is not None:
        _load_model(model, parts["model"], strict)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(parts["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise StateMismatch(f"optimizer state does not fit this optimizer: {exc}") from exc
    if scheduler is not None:
        scheduler.load_state_dict(parts["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(parts["scaler"])
    if "rng" in parts:
        set_rng(parts["rng"])  # checked by prepare
    return Restored(step=parts["step"], epoch=parts["epoch"], extra=parts["extra"])


# -- validation: everything is checked before anything changes ------------------------
def prepare(
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    strict: bool = True,
    rng: bool = True,
) -> dict[str, Any]:
    """Decode and check every part :func:`apply` would load, changing nothing: step and
    epoch, the model's keys and shapes, the optimizer's groups and hyper-parameters, the
    scheduler's and scaler's keys and value types, and the RNG states.  ``tensors`` may
    be meta tensors except for the RNG states.  Returns the decoded parts."""
    check(tree, tensors, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, strict=strict)
    parts: dict[str, Any] = {"step": _count(tree.get("step"), "step"),
                             "epoch": None if tree.get("epoch") is None else _count(tree["epoch"], "epoch")}
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            parts[name] = _decode(tree[name], tensors, name)
    extra = _decode(tree.get("extra") or {}, tensors, "extra")
    if not isinstance(extra, dict):
        raise IntegrityError(f"state.json: 'extra' is a {type(extra).__name__}, not an object; the checkpoint is damaged")
    parts["extra"] = extra
    if optimizer is not None:
        check_optimizer_values(optimizer, parts["optimizer"])
    if scheduler is not None:
        check_like(parts["scheduler"], scheduler.state_dict(), "scheduler", same_keys=True)
    if scaler is not None:
        check_like(parts["scaler"], scaler.state_dict(), "scaler", same_keys=False)
    if rng and "rng" in tree:
        parts["rng"] = _decode(tree["rng"], tensors, "rng")
        check_rng(parts["rng"])
    return parts


#: the entries of a state tree a decoded state has, besides step and epoch
_PARTS = ("model", "optimizer", "scheduler", "scaler", "extra", "rng")


def decode_parts(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Every stored entry of a state tree decoded, for readers without live objects to check
    against: ``model``, ``optimizer``, ``scheduler``, ``scaler`` and ``rng`` (None when
    absent), ``extra`` (``{}`` when absent) and ``model_aliases``: the model keys whose tensor
    was stored under another key (tied weights), each with that key.  Raises
    :class:`IntegrityError` when an entry is malformed."""
    parts: dict[str, Any] = {name: None if tree.get(name) is None else _decode(tree[name], tensors, name)
                             for name in _PARTS}
    parts["extra"] = parts["extra"] or {}
    if not isinstance(parts["extra"], dict):
        raise IntegrityError(f"state.json: 'extra' is a {type(parts['extra']).__name__}, not an object; "
                             "the checkpoint is damaged")
    model = tree.get("model")
    parts["model_aliases"] = {
        key: name.removeprefix("model/") for key, node in (model.items() if isinstance(model, dict) else ())
        if (name := tensor_name(node)) is not None and name != f"model/{key}"
    }
    return parts


def check_count(value: Any, what: str) -> int:
    """``value`` as a step or epoch read from ``state.json``: a non-negative int, else an
    :class:`IntegrityError`."""
    return _count(value, what)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IntegrityError(f"state.json: {what} is {value!r}, not a non-negative integer; the checkpoint is damaged")
    return value


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor], what: str) -> Any:
    try:
        return decode_tree(tree, tensors)
    except StateMismatch:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"state.json: the {what} state is malformed ({type(exc).__name__}: {exc}); "
                             "the checkpoint is damaged") from exc
