"""What makes a checkpoint look native in MLflow's UI: the LoggedModel's description (with the
exact restore commands), its params (the run config), its file listing, the registry version's
tags and description, and the experiment type that opens the model-training view.

Only text is built here; :mod:`.backend` sends it.  The description is the tag
``mlflow.note.content``, which the UI renders (markdown) as a model's or run's description.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import refs
from ...format import LocalCheckpoint, is_blob
from ...format.read import read_header
from .handles import BLOBS, TAG_ALIAS, TAG_STEP, TAG_VERSION

__all__ = ["EXPERIMENT_TAGS", "LISTING", "NOTE", "TAG_ALIASES", "aliases_of", "description", "listing",
           "page_tags", "registry_tags", "restore_commands"]

NOTE = "mlflow.note.content"
#: MLflow 3's UI opens an experiment on its GenAI overview unless told it is model training
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
TAG_ALIASES = "aliases"  # one readable tag: "best, latest"
#: the model's artifact listing which tensor file (in the run's ckpt_track/blobs/) holds what
LISTING = "ckpt_track_files.json"


def aliases_of(tags: Mapping[str, str]) -> list[str]:
    """The aliases a model's (or version's) ``ckpt_track.alias.<a>`` tags give it, sorted."""
    return sorted(k[len(TAG_ALIAS):] for k in tags if k.startswith(TAG_ALIAS))


def restore_commands(run_id: str, step: int) -> tuple[str, str]:
    """The CLI command and the Python call that restore the checkpoint at ``step``."""
    return refs.restore_commands(f"mlflow://{run_id}@step={step}")


def description(run_id: str, step: int, version: int, aliases: Sequence[str], tracking_uri: str | None) -> str:
    """The model's description (markdown): step, aliases, how to restore it, where its files are."""
    cli, py = restore_commands(run_id, step)
    named = ", ".join(f"`{a}`" for a in aliases) or "none"
    where = (f"with `MLFLOW_TRACKING_URI={tracking_uri}` set (or `[mlflow] tracking_uri`)"
             if tracking_uri and tracking_uri.startswith(("http://", "https://", "databricks"))
             else "with this server as `MLFLOW_TRACKING_URI` (or `[mlflow] tracking_uri`)")
    return (
        f"**ckpt_track checkpoint: step {step}** (version {version} of run `{run_id}`)\n\n"
        f"Aliases: {named}\n\n"
        f"Restore it {where}:\n\n"
        f"    {cli}\n\n"
        f"    {py}\n\n"
        f"Files: `{LISTING}` in this model's artifacts says which tensors each file holds; the tensor "
        f"files are in the run's artifacts under `{BLOBS}/`."
    )


def page_tags(step: int, version: int, aliases: Sequence[str], run_id: str, tracking_uri: str | None) -> dict[str, str]:
    """The tags that keep a model's page current: the readable alias list and the description."""
    return {TAG_ALIASES: ", ".join(aliases) or "-",
            NOTE: description(run_id, step, version, aliases, tracking_uri)}


def registry_tags(model_tags: Mapping[str, str]) -> dict[str, str]:
    """A registry version's tags, taken from its LoggedModel's: step, version, aliases."""
    keep = (TAG_STEP, TAG_VERSION, TAG_ALIASES)
    return {k: v for k, v in model_tags.items() if k in keep or k.startswith(TAG_ALIAS)}


def _group(name: str) -> str:
    """The part of the training state a tensor belongs to: ``model``, ``optimizer``, ``rng``, ..."""
    return name.split("/", 1)[0]


def listing(ckpt: LocalCheckpoint) -> dict[str, Any]:
    """Every file of the checkpoint: where it is stored, its size, and for a tensor file the
    tensors it holds (name, dtype, shape) by group.  Headers only: no tensor data is read."""
    files: list[dict[str, Any]] = []
    for fname, entry in sorted(ckpt.manifest.files.items()):
        item: dict[str, Any] = {"file": fname, "size": entry.size,
                                "stored_in": f"run artifacts {BLOBS}/" if is_blob(fname) else "model artifacts"}
        path = ckpt.path / fname
        if fname.endswith(".safetensors") and path.is_file():
            with open(path, "rb") as f:
                infos = read_header(f, fname)
            groups: dict[str, list[dict[str, Any]]] = {}
            for i in sorted(infos, key=lambda i: i.name):
                groups.setdefault(_group(i.name), []).append(
                    {"name": i.name, "dtype": str(i.dtype).removeprefix("torch."), "shape": list(i.shape)})
            item["tensors"] = groups
        files.append(item)
    return {"step": ckpt.manifest.step, "files": files}


def write_listing(ckpt: LocalCheckpoint, into: Path) -> Path:
    """Write :func:`listing` as ``LISTING`` in the directory ``into``; its path."""
    path = into / LISTING
    path.write_text(json.dumps(listing(ckpt), indent=1) + "\n", encoding="utf-8")
    return path
