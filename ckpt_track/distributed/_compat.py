"""The one place that touches torch.distributed internals (tested against the installed torch
in ``tests/unit/test_sharded_format.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["default_store", "wrap_like"]


def wrap_like(local: torch.Tensor, like: DTensor) -> DTensor:
    """A DTensor with ``like``'s mesh, placements, shape and stride over ``local`` as it is.

    ``DTensor.from_local`` moves a host tensor to the mesh's device, which would copy a staged
    host copy of a GPU shard straight back to the GPU; DCP's own staging keeps host copies in
    DTensors of the GPU mesh by constructing them from the spec, and so does this."""
    spec = getattr(like, "_spec", None)
    if spec is not None:
        try:
            return DTensor(local, spec, requires_grad=False)
        except TypeError:  # pragma: no cover - a torch whose DTensor constructor changed
            pass
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def default_store() -> Any:
    """The default process group's key-value store (the one ``init_process_group`` made)."""
    from torch.distributed import distributed_c10d as c10d

    getter = getattr(c10d, "_get_default_store", None)
    if getter is None:  # pragma: no cover - every supported torch has it
        from ..errors import DistributedError

        raise DistributedError("this torch has no default process-group store; upgrade torch")
    return getter()
