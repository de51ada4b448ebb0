"""Logging one checkpoint into a live Comet experiment, the same online and offline: the
content-addressed tensor files the experiment does not hold yet as shared experiment assets,
the other files as the elements of the checkpoint's model (manifest last), the metrics, and
optionally a registry version.  What to send is the core's dedup plan
(:func:`ckpt_track.plan.files_to_send`); the modes decide what happens around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...external import objects_of
from ...format import MANIFEST, LocalCheckpoint, Manifest, is_blob
from ...plan import files_to_send
from .handles import BLOB_PREFIX, summary_others

__all__ = ["blobs_to_send", "log_checkpoint", "register", "uploaded_bytes"]


def blobs_to_send(manifest: Manifest, held: Mapping[str, int]) -> list[str]:
    """The tensor files of ``manifest`` the experiment does not hold yet (``held``: name -> size)."""
    return sorted(f for f in files_to_send(manifest, held) if is_blob(f))


def log_checkpoint(exp: Any, src: Path, name: str, meta: Mapping[str, Any], manifest: Manifest,
                   new_blobs: Sequence[str]) -> None:
    """Log the checkpoint in ``src`` as model ``name`` (call inside ``CometSdk.calling``)."""
    exp.set_step(manifest.step)
    if manifest.epoch is not None:
        exp.set_epoch(manifest.epoch)
    for fname in new_blobs:  # files the experiment holds already are only named in metadata
        exp.log_asset(str(src / fname), file_name=BLOB_PREFIX + fname)
    for fname in sorted(meta["files"], key=lambda f: f == MANIFEST):
        exp.log_model(name, str(src / fname), file_name=fname, metadata=dict(meta), overwrite=False)
    remote = objects_of(LocalCheckpoint(src, manifest))  # a record ([storage] url): its files are in a bucket
    for fname, (url, size, digest) in sorted((remote or {}).items()):
        exp.log_remote_asset(url, remote_file_name=f"{name}/{fname}", step=manifest.step,
                             metadata={"size": size, "xxh3": digest, "checkpoint": name})
    if manifest.metrics:
        exp.log_metrics(dict(manifest.metrics), step=manifest.step, epoch=manifest.epoch)
    exp.log_others(summary_others(meta))


def register(exp: Any, name: str, registry: str, version: str | None, aliases: Sequence[str], comment: str) -> None:
    """Register model ``name`` as ``version`` of registry model ``registry`` (None: Comet picks
    it when an offline archive is uploaded); Comet registers it once the model is complete."""
    exp.register_model(name, registry_name=registry, version=version, tags=sorted(aliases), comment=comment)


def uploaded_bytes(meta: Mapping[str, Any], new_blobs: Sequence[str]) -> int:
    """What ``put`` logged: the model's elements plus the tensor files sent this time."""
    return sum(meta["files"].values()) + sum(meta["blobs"][f] for f in new_blobs)
