"""What several operations share: settings coercion and reading the tensors of a checkpoint."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import Settings, load_settings
from ..errors import IntegrityError
from ..format import STATE, LocalCheckpoint, tensor_files

__all__ = ["SettingsLike", "TensorReader", "as_settings", "bits_equal", "wide"]

SettingsLike = Settings | Mapping[str, Any] | None


def as_settings(settings: SettingsLike) -> Settings:
    """The operations take a mapping too (``settings={"local": {"root": ...}}``), as ``init`` does."""
    if isinstance(settings, Settings):
        return settings
    return load_settings(settings)


class TensorReader:
    """Tensors of a verified checkpoint, read one at a time (two whole checkpoints may not fit in memory)."""

    def __init__(self, ckpt: LocalCheckpoint, stack: contextlib.ExitStack) -> None:
        self.path = ckpt.path
        self.where: dict[str, Any] = {}
        for fname in tensor_files(ckpt.manifest):
            if Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise IntegrityError(f"{ckpt.path}: manifest entry {fname!r} escapes the checkpoint directory")
            try:
                handle = stack.enter_context(safe_open(str(ckpt.path / fname), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise IntegrityError(f"{ckpt.path / fname}: cannot read safetensors file ({exc})") from exc
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self.where[name] = handle

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def state(self) -> dict[str, Any]:
        """``state.json``: the non-tensor state (step, hyper-parameters, the model tree)."""
        try:
            data = json.loads((self.path / STATE).read_bytes())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{self.path / STATE}: cannot read ({exc})") from exc
        if not isinstance(data, dict):
            raise IntegrityError(f"{self.path / STATE}: not a JSON object")
        return data


def wide(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex) so differences of low-precision tensors are exact."""
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte comparison: ``torch.equal`` says NaN != NaN, and a restore must reproduce the bits."""
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                              b.reshape(-1).contiguous().view(torch.uint8))
