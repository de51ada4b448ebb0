"""Restore a stored checkpoint into live training objects: all or nothing.

Order of work, so that a checkpoint that cannot be applied changes nothing:

1. every file the manifest lists is opened (regular files only, never through a
   link) and those open files are hashed against the manifest;
2. ``state.json`` and every safetensors header are parsed and checked;
3. every tensor that has no live tensor to go into (and every file holding a dtype
   the fast reader does not map) is read into fresh memory;
4. the whole state is decoded and checked against the live objects
   (:func:`ckpt_track.state.prepare`): step, epoch, model keys and shapes,
   optimizer groups and hyper-parameters, scheduler and scaler state, RNG states;
5. only then are the remaining tensors read straight into the live tensors
   (``readinto``, no second copy) and the rest applied.

What remains possible is a failure of step 5 itself: the disk failing, or a file
being changed in place (same inode) between its hashing in step 1 and its read in
step 5; that raises :class:`IntegrityError` asking to restore again.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import IntegrityError
from .format import (
    STATE,
    TensorInfo,
    _fits,
    load_into,
    open_verified,
    read_manifest,
    read_state_open,
    tensor_files,
    tensor_index,
)
from .state import Restored, apply, live_tensors, prepare

if TYPE_CHECKING:
    from .resolve import Resolved

__all__ = ["restore_from"]

_NOTHING_CHANGED = "nothing was loaded into the live objects: restore again once the file is intact"


def restore_from(found: Resolved, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                 strict: bool = True, rng: bool = True) -> Restored:
    """Restore the checkpoint ``found`` into the given objects, or change none of them."""
    targets = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    ckpt = found.fetch()
    with ExitStack() as stack:
        manifest = read_manifest(ckpt.path)
        files = open_verified(ckpt.path, manifest, stack)  # nothing is loaded unless every file matches
        if STATE not in files:
            raise IntegrityError(f"{ckpt.path}: the manifest lists no {STATE}; the checkpoint is damaged")
        tree = read_state_open(files[STATE], ckpt.path / STATE)
        tensor_fds = {f: files[f] for f in tensor_files(manifest)}
        index = tensor_index(tensor_fds, ckpt.path)
        live = live_tensors(**targets)
        fresh_index, inplace_index = _split(index, live)
        fresh = load_into(ckpt.path, tensor_fds, fresh_index, {}, part_way=_NOTHING_CHANGED)
        prepare(tree, {**_meta(inplace_index), **fresh}, strict=strict, rng=rng, **targets)
        # read straight into the model's and optimizer's own tensors: no second copy
        tensors = {**fresh, **load_into(ckpt.path, tensor_fds, inplace_index, live)}
    restored = apply(tree, tensors, rng=rng, strict=strict, **targets)
    return replace(restored, metrics=dict(manifest.metrics), ref=str(found.stored.ref))


def _split(index: Mapping[str, TensorInfo],
           live: Mapping[str, torch.Tensor]) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(tensors read into fresh memory first, tensors read into live memory last).  Every tensor
    of a file holding a dtype the fast reader does not map is read first, through safetensors."""
    unmapped = {i.file for i in index.values() if i.dtype is None}
    fresh: dict[str, TensorInfo] = {}
    inplace: dict[str, TensorInfo] = {}
    for name, info in index.items():
        if info.file not in unmapped and _fits(live.get(name), info):
            inplace[name] = info
        else:
            fresh[name] = info
    return fresh, inplace


def _meta(index: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Shape-and-dtype stand-ins for tensors not read yet (every one of them has a dtype)."""
    return {name: torch.empty(i.shape, dtype=i.dtype, device="meta") for name, i in index.items()}
