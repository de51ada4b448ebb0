"""Training state of one rank for a sharded checkpoint: captured through
``torch.distributed.checkpoint.state_dict`` (DDP, FSDP2, tensor parallel, or a plain module),
split by ckpt_track's codec into a JSON tree and named tensors (DTensors stay DTensors, for
DCP to plan), and staged into memory the training loop does not touch.

Tensor names are those of the single-process format (``model/<fqn>``,
``optimizer/state/<fqn>/<key>``), world-size independent, so a checkpoint reshards.  Every
rank's RNG state is its own: ``rng/rank<r>/...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.distributed.tensor import DTensor

from ..errors import SerializationError
from ..state import encode_parts, training_parts
from ..state_codec import Encoder
from ..state_rng import capture_rng
from ..writer import StagedTensors, snapshot_tensors
from ._compat import wrap_like

__all__ = ["ShardedState", "capture_sharded", "model_tensors", "rng_name", "stage"]


def rng_name(rank: int) -> str:
    return f"rng/rank{rank}"


class ShardEncoder(Encoder):
    """The codec's encoder, taking DTensors as they are (DCP plans their shards)."""

    def tensor(self, t: torch.Tensor, name: str) -> dict[str, Any]:
        if isinstance(t, DTensor):
            if name in self.tensors:
                raise SerializationError(f"two tensors would be stored under the same name {name!r}")
            self.tensors[name] = t.detach()
            return {"__ct__": "tensor", "name": name}
        return super().tensor(t, name)


@dataclass
class ShardedState:
    """One rank's state: the JSON tree (rank 0's is stored), its RNG tree, its tensors."""

    tree: dict[str, Any]
    rng: Any
    tensors: dict[str, torch.Tensor]


def _module_states(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is not None and model is None:
        raise SerializationError("under torch.distributed an optimizer is saved with its model: pass model= too")
    if model is None:
        return {}
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def capture_sharded(*, rank: int, step: int, epoch: int | None = None, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                    extra: Mapping[str, Any] | None = None, rng: bool = True) -> ShardedState:
    """This rank's state, still aliasing the live tensors (see :func:`stage`)."""
    parts: dict[str, Any] = {"step": int(step), "epoch": epoch, **_module_states(model, optimizer),
                             **training_parts(scheduler=scheduler, scaler=scaler, extra=extra)}
    enc = ShardEncoder()
    tree = encode_parts(parts, enc)
    rng_tree = enc.encode(capture_rng(), rng_name(rank)) if rng else None
    return ShardedState(tree, rng_tree, enc.tensors)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (DTensors for a sharded model)."""
    return {f"model/{k}": v for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}


def stage(tensors: Mapping[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                          StagedTensors]:
    """Copies of ``tensors`` the loop does not touch (a DTensor's local shard is copied and
    wrapped again with its mesh and placements); the second value carries the CUDA event
    the writer waits for (:func:`ckpt_track.writer.wait_staged`)."""
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in tensors.items()}
    staged = snapshot_tensors(local, copy=True, buffers=buffers)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            out[name] = wrap_like(staged[name], t)  # stays on the host: no copy back to the device
        else:
            out[name] = staged[name]
    return out, staged
