"""What every mode of the W&B backend shares: the typed handles it keeps in ``RunInfo.native``
and ``Stored.native``, the artifact metadata of a checkpoint, the ``Stored`` built from it, and
W&B's upload rule (dedup by digest against the run's newest version)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ... import refs
from ...format import MANIFEST, LocalCheckpoint, hash_file
from ...records import RunInfo, Stored
from ...refs import Ref
from .refs import artifact_name

__all__ = ["Found", "WandbRun", "WandbVersion", "artifact_path", "description", "metadata", "restore_commands",
           "sent_bytes", "to_stored"]

Found = tuple[str, str, str]  # run id, name, entity of an existing run


@dataclass(frozen=True)
class WandbRun:
    """A run as the backend finds it again: its entity ("" offline without one) and mode."""

    entity: str
    mode: str


@dataclass(frozen=True)
class WandbVersion:
    """One checkpoint: its W&B artifact name (``e/p/ckpt-<run>:v<N-1>``), the hash of its
    ckpt_track manifest (tells a cached copy of this version from another one), and, in the
    offline store, the version's directory on local disk."""

    artifact: str
    manifest_xxh3: str | None = None
    path: str | None = None


def artifact_path(run: RunInfo, selector: int | str) -> str:
    """W&B's name for one of ``run``'s versions (0-based there), or for an alias."""
    entity = run.native.entity if isinstance(run.native, WandbRun) else None
    return artifact_name(entity or None, run.project, run.run_id, selector)


def restore_commands(ref: str) -> dict[str, str]:
    """How to get a checkpoint back, as the UI shows it: the CLI line and the Python call."""
    cli, python = refs.restore_commands(ref)
    return {"cli": cli, "python": python}


def metadata(ckpt: LocalCheckpoint, run_ref: Ref | None = None) -> dict[str, Any]:
    """The artifact metadata W&B shows for a checkpoint (and ``list`` reads back online); with
    ``run_ref``, also the reference of this step and the commands that restore it."""
    m = ckpt.manifest
    meta = {"step": m.step, "epoch": m.epoch, "metrics": dict(m.metrics), "created": m.created,
            "size": m.size, "lineage": dict(m.lineage), "format_version": m.format_version,
            "manifest_xxh3": hash_file(ckpt.path / MANIFEST)}
    if run_ref is not None:
        ref = str(run_ref.select(step=m.step))
        meta.update(ref=ref, restore=restore_commands(ref))
    return meta


def description(meta: Mapping[str, Any], aliases: Sequence[str]) -> str:
    """The artifact version's description: what W&B's artifact page shows first."""
    metrics = ", ".join(f"{k}={v:g}" for k, v in sorted((meta.get("metrics") or {}).items()))
    lines = [f"ckpt_track checkpoint at step {meta['step']}" + (f" ({metrics})" if metrics else "")]
    if aliases:
        lines.append(f"aliases: {', '.join(sorted(aliases))}")
    if restore := meta.get("restore"):
        lines += ["restore:", f"    {restore['cli']}", f"    {restore['python']}"]
    return "\n".join(lines)


def to_stored(run: RunInfo, version: int, meta: Mapping[str, Any], aliases: Sequence[str],
              path: str | None = None) -> Stored:
    """The ``Stored`` of ``run``'s version ``version`` (1-based) from its artifact metadata."""
    return Stored(ref=run.ref.select(version=version), run=run, version=version, step=int(meta["step"]),
                  epoch=None if meta.get("epoch") is None else int(meta["epoch"]),
                  aliases=tuple(sorted(aliases)),
                  metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
                  size=int(meta.get("size") or 0), created=str(meta.get("created") or ""),
                  lineage=dict(meta.get("lineage") or {}),
                  native=WandbVersion(artifact_path(run, version), meta.get("manifest_xxh3"), path))


def sent_bytes(files: Iterable[tuple[Hashable, int]], held: Iterable[Hashable]) -> int:
    """The bytes W&B uploads for a new artifact version: W&B dedups by file digest (any file, any
    name) against what the collection's newest version holds.  ``files``: (digest, size) of each
    file of the new version; ``held``: the digests of the newest version.

    This is W&B's server rule, which the "uploaded" count reports; it is wider than
    :func:`ckpt_track.plan.files_to_send` (content-addressed files, by name), which decides what
    ckpt_track itself sends: W&B also skips an unchanged file that is not content-addressed."""
    have = set(held)
    return sum(size for digest, size in files if digest not in have)
