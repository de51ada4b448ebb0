"""Capture training state into (tensors, JSON tree) and apply it back.

Everything that is a tensor goes to safetensors under a flat name such as
``model/fc.weight`` or ``optimizer/state/0/exp_avg``; everything else becomes
JSON.  Values JSON cannot express exactly are wrapped in small tagged objects
(``{"__ct__": "tuple", ...}``) so that restoring gives back the same Python
types: optimizer states have int keys and tuple hyper-parameters.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import IntegrityError, SerializationError, StateMismatch

__all__ = ["Captured", "Restored", "apply", "capture", "check", "decode_tree", "encode_tree", "live_tensors",
           "prepare"]

_TAG = "__ct__"
_MAX_NAMES = 10
_MAX_DEPTH = 64  # nesting of stored values; a reader refuses JSON nested deeper than 200 levels


# -- JSON tree codec -------------------------------------------------------------
class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        # tied/shared tensors are stored once: same storage, offset, shape, strides, dtype
        self._seen: dict[tuple[Any, ...], str] = {}

    def tensor(self, t: torch.Tensor, name: str) -> dict[str, Any]:
        t = t.detach()
        if t.layout != torch.strided or t.device.type == "meta":
            raise SerializationError(
                f"{name}: a {t.layout} tensor on {t.device} cannot be stored; "
                "convert it first (e.g. .to_dense(), or materialize meta tensors)"
            )
        if t.numel() > 0:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            first = self._seen.get(key)
            if first is not None:
                return {_TAG: "tensor", "name": first}
            self._seen[key] = name
        if name in self.tensors:
            raise SerializationError(f"two tensors would be stored under the same name {name!r}")
        self.tensors[name] = t
        return {_TAG: "tensor", "name": name}

    def encode(self, obj: Any, name: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise SerializationError(f"{name}: values nested deeper than {_MAX_DEPTH} levels cannot be stored; "
                                     "flatten the structure")
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, name)
        if type(obj).__module__ == "numpy":
            if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
                return self.encode(obj.item(), name)
            if hasattr(obj, "__array__"):
                try:
                    converted = torch.from_numpy(obj.copy())
                except TypeError as exc:
                    raise SerializationError(
                        f"{name}: a numpy array of dtype {obj.dtype} cannot be stored; use a numeric array "
                        "or a list of JSON values"
                    ) from exc
                return self.tensor(converted, name)
        d = depth + 1
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj) and _TAG not in obj:
                return {k: self.encode(v, f"{name}/{k}", d) for k, v in obj.items()}
            return {_TAG: "dict", "items": [[self.encode(k, f"{name}/{k}#key", d), self.encode(v, f"{name}/{k}", d)]
                                             for k, v in obj.items()]}
        if isinstance(obj, list):
            return [self.encode(v, f"{name}/{i}", d) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_TAG: "tuple", "items": [self.encode(v, f"{name}/{i}", d) for i, v in enumerate(obj)]}
        raise SerializationError(
            f"{name}: a value of type {type(obj).__qualname__} cannot be stored in a checkpoint; "
            "use JSON values (dict, list, str, int, float, bool, None) or tensors"
        )


def encode_tree(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON tree and the tensors it references (by name)."""
    enc = _Encoder()
    return enc.encode(obj, prefix), enc.tensors


def decode_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(tree, list):
        return [decode_tree(v, tensors) for v in tree]
    if isinstance(tree, dict):
        tag = tree.get(_TAG)
        if tag is None:
            return {k: decode_tree(v, tensors) for k, v in tree.items()}
        if tag == "tensor":
            try:
                return tensors[tree["name"]]
            except KeyError:
                raise StateMismatch(f"state.json refers to tensor {tree['name']!r}, absent from the tensor files") from None
        if tag == "tuple":
            return tuple(decode_tree(v, tensors) for v in tree["items"])
        if tag == "dict":
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in tree["items"]}
        raise StateMismatch(f"unknown tag {tag!r} in state.json (written by a newer ckpt_track?)")
    return tree


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


# -- capture ---------------------------------------------------------------------
@dataclass
class Captured:
    """Training state split into a JSON tree and named tensors (still aliasing the live ones)."""

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


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

    >>> c = capture(step=3, model=torch.nn.Linear(2, 1))
    >>> sorted(c.tensors)
    ['model/bias', 'model/weight']
    """
    parts: dict[str, Any] = {"step": int(step), "epoch": epoch}
    if model is not None:
        parts["model"] = model.state_dict()
    if optimizer is not None:
        parts["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        parts["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        parts["scaler"] = scaler.state_dict()
    if extra is not None:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise SerializationError("extra must be a dict with str keys")
        parts["extra"] = dict(extra)
    if rng:
        parts["rng"] = _rng_state()
    enc = _Encoder()
    tree: dict[str, Any] = {}
    for key, value in parts.items():
        if key == "model":  # keep model keys flat and readable: model/<state_dict key>
            tree[key] = {k: enc.tensor(v, f"model/{k}") if isinstance(v, torch.Tensor) else enc.encode(v, f"model/{k}")
                         for k, v in value.items()}
        else:
            tree[key] = enc.encode(value, key)
    return Captured(tree, enc.tensors)


# -- apply -----------------------------------------------------------------------
@dataclass(frozen=True)
class Restored:
    """What a restore put back, plus what the caller needs to continue."""

    step: int
    epoch: int | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    ref: str | None = None


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _load_model(model: torch.nn.Module, saved: Mapping[str, Any], strict: bool) -> None:
    current = model.state_dict()
    _check_model(current, saved, strict)
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


def _check_model(current: Mapping[str, Any], saved: Mapping[str, Any], strict: bool) -> None:
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


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any) -> None:
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


def _set_rng(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        n = min(len(saved), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(saved[i], i)


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
        _check_optimizer(optimizer, _decode(tree["optimizer"], tensors, "optimizer"))
    if model is not None:
        _check_model(model.state_dict(), _decode(tree["model"], tensors, "model"), strict)


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
        _set_rng(parts["rng"])
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
        _check_optimizer_values(optimizer, parts["optimizer"])
    if scheduler is not None:
        _check_like(parts["scheduler"], scheduler.state_dict(), "scheduler", same_keys=True)
    if scaler is not None:
        _check_like(parts["scaler"], scaler.state_dict(), "scaler", same_keys=False)
    if rng and "rng" in tree:
        parts["rng"] = _decode(tree["rng"], tensors, "rng")
        check_rng(parts["rng"])
    return parts


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mismatch(saved: Any, live: Any) -> str | None:
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
        return next((f"item {i}: {p}" for i, (a, b) in enumerate(zip(saved, live)) if (p := _mismatch(a, b))), None)
    if isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            return "expected an object"
        return next((f"{k!r}: {p}" for k in live if k in saved and (p := _mismatch(saved[k], live[k]))), None)
    return None  # None or a type we cannot judge: the live object decides


def _public(keys: Any) -> set[Any]:
    """Keys that say what an object is (private bookkeeping keys come and go with torch versions)."""
    return {k for k in keys if not (isinstance(k, str) and (k.startswith("_") or k == "verbose"))}


def _check_like(saved: Any, live: Mapping[str, Any], what: str, *, same_keys: bool) -> None:
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
        if key in saved and (problem := _mismatch(saved[key], live[key])):
            raise StateMismatch(f"the checkpoint's {what} state has {key!r} = {_short(saved[key])}: {problem}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: optimizer flags a checkpoint of an older torch may lack (the optimizer fills in defaults)
_OPTIONAL_FLAGS = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"})


def _check_optimizer_values(optimizer: torch.optim.Optimizer, saved: Any) -> None:
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
            problem = _mismatch(group[key], value)
            if problem:
                raise StateMismatch(f"optimizer parameter group {i} of the checkpoint has {key!r} = "
                                    f"{_short(group[key])}: {problem}")


_PY_STATE_LEN = 625
_NP_KEYS = 624


def check_rng(state: Any) -> None:
    """Raise :class:`IntegrityError` unless every saved RNG state can be set; each is tried
    on a fresh generator, never on the global ones."""
    if not isinstance(state, Mapping):
        raise IntegrityError("state.json: the rng state is not an object; the checkpoint is damaged")
    try:
        if "python" in state:
            _try_python_rng(state["python"])
        if "torch" in state:
            _try_torch_rng(state["torch"])
        if "numpy" in state:
            _try_numpy_rng(state["numpy"])
        if "cuda" in state:
            _check_cuda_rng(state["cuda"])
    except (TypeError, ValueError, OverflowError, RuntimeError, IndexError) as exc:
        raise IntegrityError(f"state.json: a saved RNG state is malformed ({exc}); the checkpoint is damaged, "
                             "or restore with rng=False") from exc


def _try_python_rng(value: Any) -> None:
    version, internal, gauss = value
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"python: version {version!r} is not an integer")
    if not isinstance(internal, (tuple, list)) or len(internal) != _PY_STATE_LEN or \
            not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in internal) or \
            internal[-1] > _PY_STATE_LEN - 1:
        raise ValueError(f"python: the state is not {_PY_STATE_LEN - 1} uint32 words and a position")
    if gauss is not None and not isinstance(gauss, float):
        raise ValueError(f"python: gauss {gauss!r} is not a float or null")
    random.Random().setstate((version, tuple(internal), gauss))


def _rng_tensor(value: Any, what: str, length: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{what}: not a 1-d uint8 tensor")
    if length is not None and value.numel() != length:
        raise ValueError(f"{what}: {value.numel()} bytes, expected {length}")
    return value


def _try_torch_rng(value: Any) -> None:
    t = _rng_tensor(value, "torch", torch.get_rng_state().numel())
    if t.device.type == "cpu":
        torch.Generator().set_state(t)


def _try_numpy_rng(value: Any) -> None:
    kind, keys, pos, has_gauss, cached = value
    if not isinstance(kind, str) or not isinstance(keys, (list, tuple)) or len(keys) != _NP_KEYS or \
            not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 2**32 for k in keys):
        raise ValueError(f"numpy: expected a kind and {_NP_KEYS} uint32 keys")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (pos, has_gauss)) or not _is_number(cached):
        raise ValueError("numpy: pos and has_gauss must be integers, cached a number")
    try:
        import numpy as np
    except ImportError:
        return
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _check_cuda_rng(value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise ValueError("cuda: not a list of states")
    available = torch.cuda.is_available()
    for i, t in enumerate(value):
        length = torch.cuda.get_rng_state(i).numel() if available and i < torch.cuda.device_count() else None
        _rng_tensor(t, f"cuda[{i}]", length)
