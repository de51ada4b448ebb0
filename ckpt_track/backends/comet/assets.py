"""Reading checkpoints back from Comet: a model's element list (and its experiment's shared
blob assets) as a ``Stored``, only when every file the metadata names arrived with its size.
Used by the online mode and by the model registry, whose versions point at experiment models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...format import is_blob
from ...records import RunInfo, Stored
from .handles import BLOB_PREFIX, CometModel, read_meta, stored
from .sdk import CometSdk

__all__ = ["BlobCache", "ModelReader"]

BlobCache = dict[str, list[tuple[str, int, str]]]  # experiment key -> (blob, size, asset id), read once


class ModelReader:
    """Models and blob assets of experiments, through the REST API."""

    def __init__(self, sdk: CometSdk) -> None:
        self.sdk = sdk

    def blob_assets(self, key: str) -> list[tuple[str, int, str]]:
        """(blob, size, asset id) of every blob asset of an experiment, duplicates included."""
        with self.sdk.calling(f"listing the assets of experiment {key}"):
            assets = self.sdk.experiment(key).get_asset_list() or []
        out = []
        for a in assets:
            fname = str(a.get("fileName") or "")
            if fname.startswith(BLOB_PREFIX) and is_blob(fname[len(BLOB_PREFIX):]):
                out.append((fname[len(BLOB_PREFIX):], int(a.get("fileSize") or -1), str(a["assetId"])))
        return out

    def from_assets(self, run: RunInfo, version: int, assets: Sequence[Mapping[str, Any]], aliases: Sequence[str],
                    key: str, name: str, blobs: BlobCache | None = None) -> Stored | None:
        """A Stored from a model's elements (and its experiment's blob assets, read once per
        ``blobs`` cache); None unless every file of the checkpoint is there."""
        meta = read_meta(assets)
        have = {str(a["fileName"]): a for a in assets}
        if meta is None or not meta.get("files") or any(
                f not in have or int(have[f].get("fileSize") or -1) != int(size) for f, size in meta["files"].items()):
            return None  # not ours, or an upload that did not finish
        ids = {f: str(have[f]["assetId"]) for f in meta["files"]}
        shared = {str(f): int(size) for f, size in (meta.get("blobs") or {}).items()}
        if shared:
            blobs = {} if blobs is None else blobs
            if key not in blobs:
                blobs[key] = self.blob_assets(key)
            found = {(f, size): asset_id for f, size, asset_id in blobs[key]}
            if any((f, size) not in found for f, size in shared.items()):
                return None  # a blob never arrived
            ids.update({f: found[(f, size)] for f, size in shared.items()})
        native = CometModel(name, key, tuple(sorted(ids.items())), tuple(sorted(shared)))
        return stored(run, version, meta, aliases, native)
