"""The global random-number generators' states: capture, check, apply.

Bit-identical resumption needs every generator a training loop draws from: Python's
``random``, numpy's legacy global generator (when numpy is installed), torch's CPU
generator and, once CUDA is initialized, every CUDA device's.  :func:`capture_rng`
returns them in the shape a checkpoint stores under ``"rng"`` (``ct.log_checkpoint``
captures the same record); :func:`apply_rng` checks a whole record first, on fresh
generators, and only then sets the global ones, so a damaged record changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from .errors import IntegrityError

__all__ = ["apply_rng", "capture_rng", "check_rng", "set_rng"]

_PY_STATE_LEN = 625
_NP_KEYS = 624


def capture_rng() -> dict[str, Any]:
    """The global RNG states now, as values a checkpoint can store (JSON and tensors).

    Keys: ``"python"`` (``random.getstate()``), ``"torch"`` (``torch.get_rng_state()``),
    ``"numpy"`` (the legacy global generator as ``[kind, keys, pos, has_gauss, cached]``,
    only when numpy is installed) and ``"cuda"`` (one state per device, only once CUDA is
    initialized).  Integrations keep such a record in their own state, e.g. the RNG at the
    start of an epoch, and give it back to :func:`apply_rng`.

    >>> state = capture_rng()
    >>> x = torch.rand(1); apply_rng(state); bool(torch.rand(1) == x)
    True
    """
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


def apply_rng(state: Mapping[str, Any]) -> None:
    """Set the global generators to a record of :func:`capture_rng` (or one read back from a
    checkpoint); generators the record lacks are left as they are, CUDA states beyond this
    machine's devices are ignored.

    Raises :class:`IntegrityError` when any saved state is malformed, before any generator
    is changed.
    """
    check_rng(state)
    set_rng(state)


def set_rng(state: Mapping[str, Any]) -> None:
    """Set the global generators without checking (for a record :func:`check_rng` accepted)."""
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _try_python_rng(value: Any) -> None:
    version, internal, gauss = value
    if not _is_int(version):
        raise ValueError(f"python: version {version!r} is not an integer")
    if not isinstance(internal, (tuple, list)) or len(internal) != _PY_STATE_LEN or \
            not all(_is_int(x) and 0 <= x < 2**32 for x in internal) or internal[-1] > _PY_STATE_LEN - 1:
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
            not all(_is_int(k) and 0 <= k < 2**32 for k in keys):
        raise ValueError(f"numpy: expected a kind and {_NP_KEYS} uint32 keys")
    if not (_is_int(pos) and _is_int(has_gauss)) or not (isinstance(cached, (int, float))
                                                         and not isinstance(cached, bool)):
        raise ValueError("numpy: pos and has_gauss must be integers, cached a number")
    try:
        import numpy as np
    except ImportError:
        return
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _check_cuda_rng(value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError("cuda: not a list of states")
    available = torch.cuda.is_available()
    for i, t in enumerate(value):
        length = torch.cuda.get_rng_state(i).numel() if available and i < torch.cuda.device_count() else None
        _rng_tensor(t, f"cuda[{i}]", length)
