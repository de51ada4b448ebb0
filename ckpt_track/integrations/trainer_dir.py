"""A ckpt_track checkpoint as a Hugging Face Trainer checkpoint directory
(:func:`checkpoint_dir`), the reverse of :mod:`ckpt_track.integrations.transformers`'s
callback: see that module's docstring for the design."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import ckpt_track as ct

__all__ = ["EXTRA_KEY", "SOURCE_FILE", "as_settings", "checkpoint_dir"]

EXTRA_KEY = "transformers"
SOURCE_FILE = "ckpt_track_source.json"  # names the checkpoint a directory was made from
# file names the Trainer reads (transformers.trainer constants; fixed since 4.x)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
RNG = "rng_state.pth"


def as_settings(settings: ct.Settings | Mapping[str, Any] | None) -> ct.Settings:
    return settings if isinstance(settings, ct.Settings) else ct.load_settings(settings)


# -- the reverse: a ckpt_track checkpoint as a Trainer checkpoint directory ------------------
def checkpoint_dir(
    ref: str | ct.Ref,
    dest: str | os.PathLike[str] | None = None,
    *,
    settings: ct.Settings | Mapping[str, Any] | None = None,
) -> Path:
    """A local directory that ``trainer.train(resume_from_checkpoint=...)`` accepts, made
    from any ckpt_track reference (run + step, alias, version, tracker URL).

    The checkpoint is verified against its manifest first.  ``dest`` must be absent or
    empty; by default the directory is ``checkpoint-<step>`` in the ckpt_track cache and
    is reused when it already holds this checkpoint.  ``settings`` are ckpt_track
    settings (a :class:`ckpt_track.Settings` or a mapping in ``ckpt_track.toml``'s shape).

    >>> path = checkpoint_dir("mlflow://0f1e2d3c4b5a69788796a5b4c3d2e1f0@step=3000")  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=str(path))                               # doctest: +SKIP
    """
    found = ct.fetch_checkpoint(ct.parse_ref(ref), settings=as_settings(settings))
    stored = found.stored
    assert stored is not None  # a reference, not a directory
    source = {"ref": str(stored.ref), "state_hash": found.state_hash}
    if dest is None:
        run = stored.run
        # one directory per world size: under DDP it also holds the per-rank RNG files
        ranks = f"ranks{_world_size()}" if _world_size() else ""
        target = (ct.cache_dir() / EXTRA_KEY / run.backend / run.project / run.run_id
                  / f"v{stored.version}" / ranks / f"checkpoint-{stored.step}")
    else:
        target = Path(dest)
    if _holds(target, source):
        return target
    if dest is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} is not empty; give a new or empty directory")
    state = found.read()
    hf = state.extra.get(EXTRA_KEY) or {}
    if state.model is None or not isinstance(hf, Mapping) or "trainer_state" not in hf:
        raise ct.StateMismatch(
            f"{stored.ref} was not logged by CkptTrackCallback (it holds no Trainer state), so a "
            "Trainer cannot resume from it; load its weights with ct.restore(ref, model=model) instead"
        )
    return _publish(target, source, state, hf, replace_stale=dest is None)


def _publish(target: Path, source: Mapping[str, str], state: ct.CheckpointState, hf: Mapping[str, Any], *,
             replace_stale: bool) -> Path:
    """Write the directory beside ``target`` and rename it into place, so that a Trainer never
    reads half of one; a concurrent maker of the same directory wins without an error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_trainer_files(tmp, state, hf)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        if target.exists() and replace_stale:  # a stale cache entry: ours to replace
            shutil.rmtree(target)
        elif target.exists():  # an empty dest (checked above)
            target.rmdir()
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _holds(target, source):  # another process made the same directory first
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _holds(path: Path, source: Mapping[str, str]) -> bool:
    try:
        return json.loads((path / SOURCE_FILE).read_text()) == dict(source)
    except (OSError, ValueError):
        return False


def _write_trainer_files(out: Path, state: ct.CheckpointState, hf: Mapping[str, Any]) -> None:
    """Write the files of a Trainer checkpoint, each in the form the Trainer loads it."""
    assert state.model is not None
    # a tied tensor (e.g. lm_head tied to the embeddings) is stored once, under the first key
    # of the state dict; like save_pretrained, keep only that key so safetensors accepts the file
    owned = {k: v.contiguous() for k, v in state.model.items()
             if isinstance(v, torch.Tensor) and k not in state.model_aliases}
    save_file(owned, str(out / WEIGHTS), metadata={"format": "pt"})

    # same serialisation as TrainerState.save_to_json, so the file is byte-identical
    (out / TRAINER_STATE).write_text(json.dumps(hf["trainer_state"], indent=2, sort_keys=True) + "\n",
                                     encoding="utf-8")
    if hf.get("model_config") is not None:
        (out / CONFIG).write_text(json.dumps(hf["model_config"], indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # the Trainer loads optimizer and scheduler only when both files are there
    if state.optimizer is not None and state.scheduler is not None:
        torch.save(state.optimizer, out / OPTIMIZER)
        torch.save(state.scheduler, out / SCHEDULER)
    if state.scaler is not None:
        torch.save(state.scaler, out / SCALER)
    if state.rng is not None:
        rng = _trainer_rng(state.rng)
        if rng is not None:
            torch.save(rng, out / RNG)
            # under DDP the Trainer reads rng_state_<rank>.pth; the world process zero recorded
            # its generators, which equal every rank's (the Trainer seeds all ranks alike and
            # they draw alike; the data order comes from the sampler's own generator)
            for rank in range(_world_size()):
                torch.save(rng, out / f"rng_state_{rank}.pth")


def _world_size() -> int:
    """The number of ranks when this process is one of several (else 0: no per-rank files):
    the process group's, or before the Trainer made it, what the launcher (torchrun) set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        world = int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        return 0
    return world if world > 1 else 0


def _trainer_rng(saved: Mapping[str, Any]) -> dict[str, Any] | None:
    """ckpt_track's RNG record in the shape of ``Trainer._save_rng_state`` (one process)."""
    if not {"python", "numpy", "torch"} <= saved.keys():
        return None  # the Trainer sets all three unconditionally; better none than a partial file
    version, internal, gauss = saved["python"]
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    out: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "cpu": saved["torch"],
    }
    if saved.get("cuda"):
        out["cuda"] = saved["cuda"][0]  # a single-process Trainer restores the current device only
    return out
