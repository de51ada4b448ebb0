"""Checkpoints outside a run: find, fetch, read and save them.

``ct.restore`` loads a checkpoint into live objects; a framework integration needs more
freedom: the framework restores its objects itself, from a dict of its own shape, and
saves through its own plugin hooks.  These functions give it the stored state without
reaching into ckpt_track's internals, with the same guarantees: every file is verified
against the manifest before anything is read, and nothing is ever unpickled.

>>> found = ct.fetch_checkpoint("local://mnist/run-1@best")   # doctest: +SKIP
>>> state = found.read()                                      # doctest: +SKIP
>>> model.load_state_dict(state.model)                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Settings
from .errors import CheckpointNotFound, IntegrityError
from .format import MANIFEST, STATE, load_checkpoint, read_manifest, write_checkpoint
from .policy import select
from .records import Stored
from .refs import Ref, parse_ref
from .resolve import cache_dir, list_stored, resolve
from .state import capture, decode_parts
from .writer import snapshot_tensors

__all__ = ["CheckpointState", "FetchedCheckpoint", "cache_dir", "fetch_checkpoint", "find_checkpoint",
           "is_checkpoint_dir", "save_checkpoint"]


@dataclass(frozen=True)
class CheckpointState:
    """A checkpoint's stored state, decoded (tensors from safetensors, the rest from JSON).

    Each entry is what ``log_checkpoint`` was given, as state dicts: ``model``,
    ``optimizer``, ``scheduler``, ``scaler`` (None when the checkpoint holds none),
    ``extra`` (``{}`` when none) and ``rng`` (the :func:`ckpt_track.capture_rng` record,
    None when saved with ``rng=False``; :func:`ckpt_track.apply_rng` sets it).  Tensors
    are on the CPU.  A tied tensor is stored once and read back as one tensor object under
    each of its keys; ``model_aliases`` maps every model key but the one it was stored under
    (the first in the state dict when captured) to that key, e.g. ``{"lm_head.weight":
    "transformer.wte.weight"}``, so a writer that wants each tensor once keeps the others out.
    """

    step: int
    epoch: int | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    model_aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FetchedCheckpoint:
    """A checkpoint on local disk, not read yet: a stored version downloaded into the cache
    (or the local backend's own directory), or a checkpoint directory given by path.

    ``stored`` is the tracker's record of it (None for a directory given by path);
    ``state_hash`` is the hash of its ``state.json`` as the manifest records it, which with
    ``ref`` tells apart what was stored under one reference (to key files made from it).
    """

    path: Path
    step: int
    epoch: int | None
    metrics: Mapping[str, float]
    state_hash: str
    stored: Stored | None = None

    @property
    def ref(self) -> str | None:
        """The canonical reference of this exact version (None for a directory given by path)."""
        return None if self.stored is None else str(self.stored.ref)

    def read(self) -> CheckpointState:
        """Verify every file against the manifest, then decode the whole state.

        Raises :class:`IntegrityError` when a file does not match or the state is malformed.
        """
        manifest, tensors, tree = load_checkpoint(self.path)
        parts = decode_parts(tree, tensors)
        return CheckpointState(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics), **parts)


def _state_hash(path: Path, files: Mapping[str, Any]) -> str:
    entry = files.get(STATE)
    if entry is None:
        raise IntegrityError(f"{path}: the manifest lists no {STATE}; the checkpoint is damaged")
    return str(entry.hash)


def fetch_checkpoint(source: str | Ref | os.PathLike[str], *, settings: Settings | None = None) -> FetchedCheckpoint:
    """The checkpoint ``source`` names, on local disk.

    ``source`` is any reference (``"local://proj/run@best"``, ``"mlflow://<run_id>@step=300"``,
    a tracker UI URL; a :class:`ckpt_track.Ref` always counts as one) or a local checkpoint
    directory (a path object, or a string naming an existing directory).  A remote version is
    downloaded into the cache (:func:`cache_dir`), reusing what is there already.

    >>> found = fetch_checkpoint("local://mnist/run-1@latest")   # doctest: +SKIP
    >>> found.step, found.ref                                    # doctest: +SKIP
    (300, 'local://mnist/3k2j1x:v3')
    """
    if not isinstance(source, (str, Ref)) or (isinstance(source, str) and os.path.isdir(source)):
        path = Path(source)
        manifest = read_manifest(path)
        stored: Stored | None = None
    else:
        found = resolve(source, settings)
        local = found.fetch()
        path, manifest, stored = local.path, local.manifest, found.stored
    return FetchedCheckpoint(path=path, step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                             state_hash=_state_hash(path, manifest.files), stored=stored)


def find_checkpoint(ref: str | Ref, settings: Settings | None = None) -> Stored | None:
    """The stored version ``ref`` selects, or None when its run does not exist yet or holds
    no checkpoint (a first start).  A run that has checkpoints but none that matches (``@step=N``
    of a step never logged) raises :class:`CheckpointNotFound` listing what exists.

    >>> find_checkpoint("local://mnist/run-1")   # doctest: +SKIP
    """
    parsed = parse_ref(ref)
    try:
        stored = list_stored(parsed, settings)
    except CheckpointNotFound:
        return None
    if not stored:
        return None
    return select(stored, parsed)


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed ckpt_track checkpoint directory (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    step: int,
    epoch: int | None = None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Write a checkpoint directory at ``path``, outside any run and tracker.

    The objects are captured as ``log_checkpoint`` captures them (anything with
    ``state_dict()`` will do).  The directory is written beside ``path`` and swapped in,
    so a reader never sees half of it and an existing checkpoint there is replaced whole.

    >>> ct.save_checkpoint("ckpts/last", step=300, model=model, optimizer=opt)  # doctest: +SKIP
    """
    target = Path(path)
    captured = capture(step=step, epoch=epoch, model=model, optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, extra=extra, rng=rng)
    tensors = snapshot_tensors(captured.tensors, copy=False)
    tmp_name = f".{target.name}-{uuid.uuid4().hex[:8]}"
    ckpt = write_checkpoint(target.parent, tmp_name, tensors, captured.tree, step=step, epoch=epoch)
    # POSIX cannot rename over a non-empty directory, hence two renames around the swap
    old = target.parent / f".{target.name}-old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    os.rename(ckpt.path, target)
    if old.exists():
        shutil.rmtree(old)
    return target
