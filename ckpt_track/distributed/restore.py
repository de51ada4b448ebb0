"""Restoring a checkpoint through DCP's load planner: any world size, sharded or not.

One reader for both formats: a sharded checkpoint (v2) brings its ``layout.json``, a
single-process one (v1) gets the equivalent layout from its safetensors headers.  The order
keeps the promise that a restore either fully succeeds or changes nothing:

1. the manifest, ``state.json`` and ``layout.json`` are verified against their hashes;
2. every tensor the live objects need is found in the layout with the live global shape and
   dtype (``StateMismatch`` otherwise), and fresh memory of the live placement is allocated;
3. DCP reads the chunks this rank needs into that memory (each file hashed before it is read);
4. ``agree`` (every rank of a collective resume) confirms all ranks got this far;
5. only then are model, optimizer, scheduler, scaler and RNG set.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

from ..errors import IntegrityError, StateMismatch
from ..format import (
    LAYOUT,
    STATE,
    Manifest,
    check_name,
    hash_open,
    load_json,
    open_regular,
    read_exact,
    read_manifest,
    tensor_files,
    tensor_index,
)
from ..state import Restored, check_count
from ..state_checks import check_like
from ..state_codec import decode_tree, tensor_name
from ..state_rng import check_rng, set_rng
from .capture import model_tensors
from .comm import first_failure
from .layout import Layout, from_index, parse_layout

__all__ = ["restore_dir"]

log = logging.getLogger("ckpt_track")
_OPT_STATE = re.compile(r"^optimizer/state/(.+)/([^/]+)$")


@dataclass
class _Read:
    manifest: Manifest
    tree: dict[str, Any]
    layout: Layout


def _json_file(path: Path, manifest: Manifest, name: str) -> Any:
    entry = manifest.files.get(name)
    if entry is None:
        raise IntegrityError(f"{path}: the manifest lists no {name}; the checkpoint is damaged")
    with open_regular(path / check_name(name, path)) as f:
        if os.fstat(f.fileno()).st_size != entry.size or hash_open(f, entry.size) != entry.hash:
            raise IntegrityError(f"{path}/{name}: does not match the manifest (modified or corrupted); "
                                 "nothing was loaded")
        return load_json(read_exact(f, entry.size, path / name, offset=0), path / name)


def read_dir(path: Path) -> _Read:
    """Step 1: the verified manifest, state tree and layout of a checkpoint directory."""
    manifest = read_manifest(path)
    tree = _json_file(path, manifest, STATE)
    if not isinstance(tree, dict):
        raise IntegrityError(f"{path}/{STATE}: not a JSON object")
    if manifest.sharded:
        layout = parse_layout(_json_file(path, manifest, LAYOUT), f"{path}/{LAYOUT}")
    else:
        with ExitStack() as stack:
            fds = {f: stack.enter_context(open_regular(path / check_name(f, path))) for f in tensor_files(manifest)}
            layout = from_index(tensor_index(fds, path))
    return _Read(manifest, tree, layout)


def _names(node: Any) -> set[str]:
    """Every tensor name a tree refers to."""
    if (name := tensor_name(node)) is not None:
        return {name}
    if isinstance(node, dict):
        return set().union(*(_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_names(v) for v in node)) if node else set()
    return set()


def _target(name: str, read: _Read, live: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fresh memory for stored tensor ``name``: of the live tensor's placement when there is one."""
    entry = read.layout.tensors.get(name)
    if entry is None:
        raise IntegrityError(f"state.json refers to tensor {name!r}, absent from the checkpoint's layout")
    like = live.get(name)
    if like is None and (m := _OPT_STATE.match(name)) and f"model/{m.group(1)}" in live:
        param = live[f"model/{m.group(1)}"]  # an optimizer state of a parameter's shape is placed like it
        like = param if tuple(param.shape) == entry.size else None
    if like is not None and (tuple(like.shape) != entry.size or like.dtype != entry.dtype):
        raise StateMismatch(f"{name}: checkpoint {list(entry.size)} {entry.dtype} vs live {list(like.shape)} "
                            f"{like.dtype}; the checkpoint does not fit this model")
    if like is not None:
        return torch.empty_like(like)
    return torch.empty(entry.size, dtype=entry.dtype)


def _check_model(tree: dict[str, Any], live: dict[str, torch.Tensor], strict: bool) -> None:
    stored = {f"model/{k}" for k in tree.get("model", {})}
    missing = sorted(k.removeprefix("model/") for k in set(live) - stored)
    unexpected = sorted(k.removeprefix("model/") for k in stored - set(live))
    if strict and (missing or unexpected):
        raise StateMismatch("model state does not match the checkpoint; "
                            + "; ".join(p for p in (missing and f"missing from the checkpoint: {missing[:8]}",
                                                    unexpected and f"not in the model: {unexpected[:8]}") if p)
                            + " (pass strict=False to ignore missing/unexpected keys)")


def _wanted(read: _Read, rank: int, targets: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The parts of the tree this restore loads, and this rank's RNG tree (None when absent)."""
    tree = read.tree
    parts = {k: tree[k] for k in ("model", "optimizer", "scheduler", "scaler") if targets.get(k) is not None}
    for k, v in parts.items():
        if v is None:
            raise StateMismatch(f"the checkpoint holds no {k} state (it was saved without {k}=...)")
    parts["extra"] = tree.get("extra") or {}
    rng_all = tree.get("rng")
    if read.manifest.sharded:
        mine = rng_all.get(f"rank{rank}") if isinstance(rng_all, dict) else None
    else:
        mine = rng_all if rank == 0 else None
    return parts, mine


def restore_dir(path: Path, *, rank: int = 0, model: torch.nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                strict: bool = True, rng: bool = True,
                agree: Callable[[BaseException | None], None] | None = None) -> Restored:
    """Restore the checkpoint at ``path`` into this rank's objects (see the module docstring).
    ``agree(error)`` is called once every tensor is read (``error`` None) or on failure; it
    raises unless every rank succeeded."""
    try:
        read, decoded, rng_state = _load(path, rank, model, optimizer, scheduler, scaler, strict, rng)
    except BaseException as exc:
        if agree is not None:
            agree(exc)
        raise
    if agree is not None:
        agree(None)
    _apply(decoded, model, optimizer, scheduler, scaler, strict)
    if rng_state is not None:
        set_rng(rng_state)
    return Restored(step=check_count(read.tree.get("step"), "step"), epoch=read.tree.get("epoch"), extra=decoded["extra"],
                    metrics=dict(read.manifest.metrics))


def _load(path: Path, rank: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any, strict: bool,
          rng: bool) -> tuple[_Read, dict[str, Any], Any]:
    read = read_dir(Path(path))
    check_count(read.tree.get("step"), "step")
    parts, rng_tree = _wanted(read, rank, {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                                           "scaler": scaler})
    if rng and read.tree.get("rng") is not None and rng_tree is None:
        log.warning("ckpt_track: the checkpoint holds no RNG state for rank %d (written by %d rank(s)); this rank "
                    "keeps its own generators", rank, read.layout.world_size)
    live = model_tensors(model) if model is not None else {}
    if model is not None:
        _check_model(read.tree, live, strict)
    wanted = _names(parts) | (_names(rng_tree) if rng and rng_tree is not None else set())
    if model is not None and not strict:
        wanted = {n for n in wanted if not n.startswith("model/") or n in live}
    targets = {name: _target(name, read, live) for name in sorted(wanted)}
    if targets:
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp_load(targets, storage_reader=_reader(Path(path), read),
                         planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        except CheckpointException as exc:
            raise first_failure(f"reading {path}", exc) from exc
    try:
        decoded = {k: decode_tree(v, targets) for k, v in parts.items()}
        rng_state = decode_tree(rng_tree, targets) if rng and rng_tree is not None else None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"{path}/state.json: malformed ({type(exc).__name__}: {exc}); the checkpoint is "
                             "damaged") from exc
    if model is not None and not strict:
        decoded["model"] = {k: v for k, v in decoded["model"].items() if f"model/{k}" in live}
    if scheduler is not None:
        check_like(decoded["scheduler"], scheduler.state_dict(), "scheduler", same_keys=True)
    if scaler is not None:
        check_like(decoded["scaler"], scaler.state_dict(), "scaler", same_keys=False)
    if not isinstance(decoded["extra"], dict):
        raise IntegrityError(f"{path}/state.json: 'extra' is not an object; the checkpoint is damaged")
    if rng_state is not None:
        check_rng(rng_state)
    return read, decoded, rng_state


def _reader(path: Path, read: _Read) -> Any:
    from .storage import ShardReader

    return ShardReader(path, read.manifest, read.layout.metadata())


def _apply(decoded: dict[str, Any], model: Any, optimizer: Any, scheduler: Any, scaler: Any, strict: bool) -> None:
    opts = StateDictOptions(strict=strict)
    try:
        if model is not None and optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=decoded["model"],
                           optim_state_dict=decoded["optimizer"], options=opts)
        elif model is not None:
            set_model_state_dict(model, decoded["model"], options=opts)
        elif optimizer is not None:
            raise StateMismatch("restoring an optimizer through the sharded reader needs its model: pass model= too")
    except (RuntimeError, KeyError, ValueError) as exc:
        raise StateMismatch(f"the checkpoint does not fit the model/optimizer: {exc}") from exc
    if scheduler is not None:
        scheduler.load_state_dict(decoded["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(decoded["scaler"])

