"""The JSON tree codec: any training state as (JSON tree, named tensors) and back.

Everything that is a tensor goes to safetensors under a flat name such as
``model/fc.weight`` or ``optimizer/state/0/exp_avg``; everything else becomes JSON.
Values JSON cannot express exactly are wrapped in small tagged objects
(``{"__ct__": "tuple", ...}``) so that decoding gives back the same Python types:
optimizer states have int keys and tuple hyper-parameters.  Nothing here pickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import SerializationError, StateMismatch

__all__ = ["Encoder", "decode_tree", "encode_tree", "is_storable", "tensor_name"]

_TAG = "__ct__"
_MAX_DEPTH = 64  # nesting of stored values; a reader refuses JSON nested deeper than 200 levels


class Encoder:
    """Encodes values into one JSON tree, collecting the tensors it refers to by name.

    One encoder per checkpoint, so that tied/shared tensors (same storage, offset, shape,
    strides and dtype) are stored once however many entries refer to them."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple[Any, ...], str] = {}

    def tensor(self, t: torch.Tensor, name: str) -> dict[str, Any]:
        """A reference to ``t``, stored under ``name`` unless an identical view was stored before."""
        if type(t).__name__ == "DTensor":
            raise SerializationError(
                f"{name}: a DTensor (FSDP2 or tensor parallel shard) is saved by every rank together: call "
                "ct.init, log_checkpoint and resume on every rank of the process group (distributed='auto')"
            )
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
        """``obj`` as JSON, its tensors named after their path below ``name``."""
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
            return self._numpy(obj, name)
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

    def _numpy(self, obj: Any, name: str) -> Any:
        """numpy scalars become JSON numbers, arrays tensors (numeric dtypes only)."""
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
        raise SerializationError(
            f"{name}: a value of type {type(obj).__qualname__} cannot be stored in a checkpoint; "
            "use JSON values (dict, list, str, int, float, bool, None) or tensors"
        )


def encode_tree(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON tree and the tensors it references (by name).

    >>> tree, tensors = encode_tree({"w": torch.zeros(2), "betas": (0.9, 0.99)}, "opt")
    >>> sorted(tensors), tree["betas"]["__ct__"]
    (['opt/w'], 'tuple')
    """
    enc = Encoder()
    return enc.encode(obj, prefix), enc.tensors


def decode_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`: tagged objects become tuples, int-keyed dicts and tensors."""
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


def tensor_name(node: Any) -> str | None:
    """The stored name a tree node refers to, when it is a tensor reference (else None)."""
    if isinstance(node, dict) and node.get(_TAG) == "tensor" and isinstance(node.get("name"), str):
        return str(node["name"])
    return None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def is_storable(value: Any) -> bool:
    """Whether a checkpoint can hold ``value`` exactly: JSON values, tensors, numpy numbers and
    arrays, tuples and dicts with non-string keys, nested up to 64 levels.  Lets an integration
    drop or stringify what a framework adds before logging, instead of failing mid-training.

    >>> is_storable({"lr": 0.1, "betas": (0.9, 0.99)}), is_storable(object())
    (True, False)
    """
    try:
        Encoder().encode(value, "value")
    except SerializationError:
        return False
    return True
