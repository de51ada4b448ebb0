"""The mean of several checkpoints' model weights (stochastic weight averaging, model soups).

Floating ``model/*`` tensors are summed in float64 one checkpoint at a time (only one
source's model is in memory besides the running sums) and stored in each tensor's dtype."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .. import provenance
from ..config import Settings
from ..errors import ConfigError, StateMismatch
from ..format import LocalCheckpoint, write_checkpoint
from ..records import Stored
from ..refs import Ref
from ..resolve import Resolved, Resolver
from ._common import SettingsLike, TensorReader, as_settings, bits_equal, wide
from .copy import open_target

__all__ = ["AverageResult", "average"]

_REF_TEXT = re.compile(r"^[a-z][a-z0-9_\-]*://")
_MODEL_PREFIX = "model/"


@dataclass(frozen=True)
class AverageResult:
    """The averaged checkpoint: on disk (``path``) or logged to a run (``stored``)."""

    sources: tuple[str, ...]  # canonical references, in the order given
    step: int
    averaged: tuple[str, ...]  # tensor names averaged
    taken: tuple[str, ...]  # non-float tensor names taken from the first checkpoint
    path: Path | None = None
    stored: Stored | None = None


def _model_tensors(ckpt: LocalCheckpoint, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The model subtree of ``state.json`` and the ``model/*`` tensors, nothing else (optimizer
    state can be several times the model's size)."""
    with contextlib.ExitStack() as stack:
        reader = TensorReader(ckpt, stack)
        state = reader.state()
        if not isinstance(state.get("model"), dict):
            raise StateMismatch(f"{where} holds no model state (it was saved without model=...)")
        tensors = {n: reader.get(n) for n in sorted(reader.names()) if n.startswith(_MODEL_PREFIX)}
    return state, tensors


def _mismatch(names: Iterable[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:10]) + (f" (+{len(shown) - 10} more)" if len(shown) > 10 else "")


def _average_tensors(
    loaded: Iterator[tuple[str, dict[str, torch.Tensor]]], non_float: Literal["equal", "first"]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    first_where, first = next(loaded)
    floating = sorted(n for n, t in first.items() if t.is_floating_point() or t.is_complex())
    sums = {n: wide(first[n]) for n in floating}
    count = 1
    for where, tensors in loaded:
        if set(tensors) != set(first):
            raise StateMismatch(
                f"{where} does not hold the same model tensors as {first_where}: "
                f"only in {first_where}: {_mismatch(set(first) - set(tensors)) or '-'}; "
                f"only in {where}: {_mismatch(set(tensors) - set(first)) or '-'}"
            )
        bad = [f"{n}: {tuple(t.shape)} {t.dtype} vs {tuple(first[n].shape)} {first[n].dtype}"
               for n, t in sorted(tensors.items()) if t.shape != first[n].shape or t.dtype != first[n].dtype]
        if bad:
            raise StateMismatch(f"{where} and {first_where} differ in shape or dtype: {_mismatch(bad)}")
        if non_float == "equal":
            unequal = [n for n in first if n not in sums and not bits_equal(first[n], tensors[n])]
            if unequal:
                raise StateMismatch(
                    f"non-float tensors differ between {first_where} and {where}: {_mismatch(unequal)}; they "
                    "cannot be averaged (pass non_float='first' / --non-float first to take them from the first)"
                )
        for n in floating:
            sums[n] += wide(tensors[n])
        count += 1
    out = {n: first[n].clone() for n in first if n not in sums}
    out.update({n: (sums[n] / count).to(first[n].dtype).contiguous() for n in floating})
    taken = tuple(sorted(n for n in first if n not in sums))
    return out, tuple(floating), taken



def _check_arguments(refs: Sequence[str | Ref], aliases: Sequence[str], non_float: str) -> None:
    """Refuse bad arguments before anything is resolved or downloaded."""
    if non_float not in ("equal", "first"):
        raise ConfigError(f"non_float must be 'equal' or 'first', got {non_float!r}")
    if len(refs) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(refs)}")
    for a in aliases:
        Ref("x", alias=a)  # validates the characters


def _output_dir(out_text: str) -> Path:
    """The output directory, refused unless new or empty (an average never overwrites)."""
    dest = Path(out_text).expanduser().absolute()
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise ConfigError(f"{dest} exists and is not an empty directory; pick a new or empty output")
    return dest


def _averaged_model(
    found: Sequence[Resolved], non_float: Literal["equal", "first"]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """(averaged tensors, names averaged, names taken from the first, the model subtree of
    ``state.json``); the sources must agree on every tensor name and non-tensor model entry."""
    trees: list[tuple[str, dict[str, Any]]] = []

    def load_all() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for f in found:  # one checkpoint's model in memory at a time, plus the running sums
            where = str(f.stored.ref)
            state, tensors = _model_tensors(f.fetch_verified(), where)
            trees.append((where, state["model"]))
            yield where, tensors

    tensors, averaged, taken = _average_tensors(load_all(), non_float)
    first_where, model_tree = trees[0]
    for where, tree in trees[1:]:
        if tree != model_tree:  # same tensor names but other keys or non-tensor entries
            keys = {k for k in set(tree) | set(model_tree) if tree.get(k) != model_tree.get(k)}
            raise StateMismatch(f"the model state of {where} differs from {first_where} in {_mismatch(keys)}")
    return tensors, averaged, taken, model_tree


def _log_to_run(target: str, settings: Settings, tensors: Mapping[str, torch.Tensor], tree: dict[str, Any],
                lineage_info: dict[str, Any], aliases: Sequence[str]) -> Stored:
    """Log the average into the run ``target`` names.  A new run gets ``latest`` and ``step-N``;
    an existing one only ``aliases``, so its ``latest`` (what resumes use) stays where it is."""
    step, epoch = tree["step"], tree["epoch"]
    backend, run = open_target(target, settings)
    try:
        fresh = not backend.list(run)
        lineage_info["run"] = str(run.ref)
        with tempfile.TemporaryDirectory(prefix="ckpt-track-average-") as tmp:
            ckpt = write_checkpoint(Path(tmp), "averaged", tensors, tree, step=step, epoch=epoch,
                                    lineage=lineage_info, shard_size=settings.shard_size)
            names = [*(["latest", f"step-{step}"] if fresh else []), *aliases]
            return backend.put(run, ckpt, list(dict.fromkeys(names)))
    finally:
        backend.finish_run(run)


def average(
    refs: Sequence[str | Ref],
    output: str | os.PathLike[str],
    *,
    aliases: Sequence[str] = (),
    non_float: Literal["equal", "first"] = "equal",
    settings: SettingsLike = None,
) -> AverageResult:
    """Average the model weights of several checkpoints (element-wise mean of the floating
    ``model/*`` tensors, computed in float64 and stored in each tensor's dtype).

    Non-float tensors (integer buffers) are taken from the first checkpoint; with
    ``non_float="equal"`` they must be equal in all of them.  The result holds the model
    only (no optimizer, scheduler or RNG: they do not belong to averaged weights), the
    step and epoch of the newest source, no metrics, and lineage ``averaged_from``.

    ``output`` is a directory (new or empty) or a run reference (see :func:`ckpt_track.ops.copy.open_target`).
    Logged into a new run it gets ``latest`` and ``step-N``; into an existing run it moves
    no alias but ``aliases``, so that run's ``latest`` (what resumes use) stays where it is.

    >>> average(["local://p/r:v8", "local://p/r:v9", "local://p/r:v10"], "./swa")  # doctest: +SKIP
    """
    _check_arguments(refs, aliases, non_float)
    s = as_settings(settings)
    resolver = Resolver(s, skip_damaged=True)
    found = [resolver.resolve(r) for r in refs]
    sources = tuple(str(f.stored.ref) for f in found)
    newest = max(found, key=lambda f: f.stored.step).stored  # max() keeps the first of equal steps
    out_text = os.fspath(output)
    dest = None if _REF_TEXT.match(out_text) else _output_dir(out_text)
    tensors, averaged, taken, model_tree = _averaged_model(found, non_float)
    step, epoch = newest.step, newest.epoch
    tree = {"step": step, "epoch": epoch, "model": model_tree}
    lineage_info: dict[str, Any] = {
        "parent": str(newest.ref), "resumed_from": None, "averaged_from": list(sources),
        "git": provenance.git_info(), **provenance.environment(),
    }
    if dest is None:
        stored = _log_to_run(out_text, s, tensors, tree, lineage_info, aliases)
        return AverageResult(sources, step, averaged, taken, stored=stored)
    if dest.exists():
        dest.rmdir()  # empty: write_checkpoint publishes by renaming onto a fresh name
    ckpt = write_checkpoint(dest.parent, dest.name, tensors, tree, step=step, epoch=epoch,
                            lineage=lineage_info, shard_size=s.shard_size)
    return AverageResult(sources, step, averaged, taken, path=ckpt.path)
