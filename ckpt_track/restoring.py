"""Restore a stored checkpoint: into live training objects (:func:`restore_from`), or its
files into a directory of their own (:func:`restore_into`, behind ``ckpt-track restore``).
Both are all or nothing.

Into live objects, the order of work, so that a checkpoint that cannot be applied changes nothing:

1. every file the manifest lists is opened (regular files only, never through a
   link) and those open files are hashed against the manifest, several at a time (each file
   is hashed once: a copy in the download cache is reused unhashed, ``cache.hashing_deferred``,
   and fetched again the usual way when it does not verify here);
2. ``state.json`` and every safetensors header are parsed and checked;
3. every tensor that has no live tensor to go into (and every file holding a dtype
   the fast reader does not map) is read into fresh memory;
4. the whole state is decoded and checked against the live objects
   (:func:`ckpt_track.state.prepare`): step, epoch, model keys and shapes,
   optimizer groups and hyper-parameters, scheduler and scaler state, RNG states;
5. only then are the remaining tensors read straight into the live tensors
   (``preadv`` by a few threads, no second copy) and the rest applied.

What remains possible is a failure of step 5 itself: the disk failing, or a file
being changed in place (same inode) between its hashing in step 1 and its read in
step 5; that raises :class:`IntegrityError` asking to restore again.

Into a directory, the files are copied into a hidden sibling of the destination and renamed
into place, so the destination never holds a partial checkpoint.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import torch

from .cache import hashing_deferred
from .errors import ConfigError, IntegrityError
from .format import (
    MANIFEST,
    STATE,
    LocalCheckpoint,
    Manifest,
    TensorInfo,
    copy_checkpoint,
    fits,
    fsync_dir,
    load_into,
    open_verified,
    read_manifest,
    read_state_open,
    tensor_files,
    tensor_index,
)
from .state import Restored, apply, live_tensors, prepare

if TYPE_CHECKING:
    from .records import Stored

__all__ = ["check_destination", "restore_from", "restore_into"]

_NOTHING_CHANGED = "nothing was loaded into the live objects: restore again once the file is intact"


class Fetchable(Protocol):
    """What a restore reads of the checkpoint it restores: its ``Stored`` (for the ref it
    reports) and ``fetch()`` (the checkpoint on local disk): a resolved reference, or a
    checkpoint still in the spool."""

    @property
    def stored(self) -> Stored: ...

    def fetch(self) -> LocalCheckpoint: ...


def restore_from(found: Fetchable, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                 strict: bool = True, rng: bool = True) -> Restored:
    """Restore the checkpoint ``found`` into the given objects, or change none of them."""
    targets = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    with ExitStack() as stack:
        ckpt, opened = _fetch_opened(found, stack, _sharded_model(model))
        if opened is None:
            # written by several ranks, or a model whose parameters are shards (FSDP2, tensor
            # parallel): through DCP's load planner, resharded to this process
            from .distributed.comm import rank_and_world
            from .distributed.restore import restore_dir

            restored = restore_dir(ckpt.path, rank=rank_and_world()[0], strict=strict, rng=rng, **targets)
            return replace(restored, ref=str(found.stored.ref))
        manifest, files = opened  # nothing is loaded unless every file matched
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


def _fetch_opened(found: Fetchable, stack: ExitStack, sharded_model: bool,
                  ) -> tuple[LocalCheckpoint, tuple[Manifest, dict[str, BinaryIO]] | None]:
    """The checkpoint on local disk with its manifest and every file open and hashed against it
    (None for one read through DCP, whose reader hashes what it reads).

    Each file is hashed once, here: a copy in the download cache is reused without re-hashing it
    first (:func:`ckpt_track.cache.hashing_deferred`).  When such a copy does not verify (it
    rotted since it was fetched), or is sharded (DCP hashes only what this rank reads), it is
    fetched again the usual way: re-hashed by the cache, fetched anew when damaged."""
    reused: list[Path] = []
    try:
        with hashing_deferred() as reused:
            ckpt = found.fetch()
        if not reused or not _through_dcp(ckpt, sharded_model):
            return ckpt, _opened(ckpt, stack, sharded_model)
    except IntegrityError:
        if not reused:
            raise
    ckpt = found.fetch()
    return ckpt, _opened(ckpt, stack, sharded_model)


def _through_dcp(ckpt: LocalCheckpoint, sharded_model: bool) -> bool:
    return ckpt.manifest.sharded or sharded_model


def _opened(ckpt: LocalCheckpoint, stack: ExitStack,
            sharded_model: bool) -> tuple[Manifest, dict[str, BinaryIO]] | None:
    """Every file of ``ckpt`` open and hashed against its manifest (None when read through DCP)."""
    if _through_dcp(ckpt, sharded_model):
        return None
    manifest = read_manifest(ckpt.path)
    return manifest, open_verified(ckpt.path, manifest, stack)


def _sharded_model(model: torch.nn.Module | None) -> bool:
    """True when the model's parameters are DTensors (FSDP2, tensor parallel)."""
    return model is not None and any(type(p).__name__ == "DTensor" for p in model.parameters())


def _split(index: Mapping[str, TensorInfo],
           live: Mapping[str, torch.Tensor]) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(tensors read into fresh memory first, tensors read into live memory last).  Every tensor
    of a file holding a dtype the fast reader does not map is read first, through safetensors."""
    unmapped = {i.file for i in index.values() if i.dtype is None}
    fresh: dict[str, TensorInfo] = {}
    inplace: dict[str, TensorInfo] = {}
    for name, info in index.items():
        if info.file not in unmapped and fits(live.get(name), info):
            inplace[name] = info
        else:
            fresh[name] = info
    return fresh, inplace


def _meta(index: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Shape-and-dtype stand-ins for tensors not read yet (every one of them has a dtype)."""
    return {name: torch.empty(i.shape, dtype=i.dtype, device="meta") for name, i in index.items()}


# --------------------------------------------------------------------------- into a directory


def _absolute(dest: Path) -> Path:
    """``dest`` made absolute; a symlink is followed so the rename replaces its target, not the link."""
    dest = Path(os.path.abspath(dest.expanduser()))
    return dest.resolve() if dest.is_symlink() else dest


def check_destination(dest: Path, force: bool) -> bool:
    """Raise unless ``dest`` may receive a checkpoint; True when an old one is to be replaced.

    Called before anything is downloaded or hashed too, so that a bad destination fails fast."""
    dest = _absolute(dest)
    if not dest.name:
        raise ConfigError(f"cannot restore into {dest}; give a directory below it")
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise ConfigError(f"{dest} exists and is not a directory; pick another --output")
    if not any(dest.iterdir()):
        return False
    if not force:
        raise ConfigError(
            f"{dest} is not empty; pick an empty or new directory, or pass --force to replace "
            "a checkpoint restored there before"
        )
    if not (dest / MANIFEST).is_file():
        # --force must never become `rm -rf` of an arbitrary directory given by mistake
        raise ConfigError(
            f"{dest} is not empty and holds no checkpoint ({MANIFEST}); --force only replaces a "
            "previously restored checkpoint, so empty it yourself or pick another --output"
        )
    return True


def restore_into(ckpt: LocalCheckpoint, dest: Path, *, force: bool = False,
                 progress: Callable[[int], None] | None = None) -> LocalCheckpoint:
    """Copy a verified checkpoint's files and manifest so they sit directly in ``dest``.

    ``dest`` must not exist or be empty; with ``force`` a directory holding an
    earlier checkpoint is replaced.  The copy is staged in a hidden sibling and
    renamed into place, so ``dest`` never holds a partial checkpoint.
    """
    dest = _absolute(dest)
    replace_old = check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staged = copy_checkpoint(ckpt, dest.parent, f".{dest.name}.restoring-{tag}", link=False, progress=progress)
    old = dest.parent / f".{dest.name}.replaced-{tag}"
    try:
        if replace_old:
            os.rename(dest, old)
            try:
                os.rename(staged.path, dest)
            except OSError:
                os.rename(old, dest)  # put the previous checkpoint back
                raise
        else:
            os.rename(staged.path, dest)  # POSIX replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(staged.path, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    if replace_old:
        shutil.rmtree(old, ignore_errors=True)
    return LocalCheckpoint(dest, ckpt.manifest)
