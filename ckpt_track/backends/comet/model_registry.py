"""Comet's model registry, read-only: ``registry://<workspace>/<model>`` is a run whose
versions (in version order, ``:vN`` the N-th) are the registered ckpt_track checkpoints,
aliased by their version string, stages and tags; and the next major version
``register_as`` registers a new checkpoint as.  Only online: the registry lives on the server.
"""

from __future__ import annotations

from dataclasses import replace

from ...records import RunInfo, Stored
from ...refs import Ref
from .assets import BlobCache, ModelReader
from .handles import CometRegistryModel
from .refs import NAME, SEGMENT, semver
from .sdk import CometSdk

__all__ = ["ModelRegistry"]


class ModelRegistry:
    """Registry models of the server ``sdk`` talks to."""

    def __init__(self, sdk: CometSdk, reader: ModelReader) -> None:
        self.sdk = sdk
        self.reader = reader

    def run(self, workspace: str, model: str) -> RunInfo:
        with self.sdk.calling(f"reading registry model {workspace}/{model}"):
            self.sdk.api().get_registry_model_details(workspace, model)
        ref = Ref(NAME, f"registry/{workspace}/{model}", params=self.sdk.ref_params())
        return RunInfo(backend=NAME, project="registry", run_id=f"{workspace}/{model}", name=model, ref=ref,
                       resumed=True, native=CometRegistryModel(workspace, model))

    def list(self, run: RunInfo) -> list[Stored]:
        handle: CometRegistryModel = run.native
        with self.sdk.calling(f"reading registry model {run.run_id}"):
            details = self.sdk.api().get_registry_model_details(handle.workspace, handle.model)
        items = sorted(details.get("versions") or [], key=lambda v: semver(str(v.get("version"))))
        blobs: BlobCache = {}
        out = []
        for i, item in enumerate(items, 1):  # :vN is the N-th version in version order
            source = item.get("experimentModel") or {}
            tags = {t for t in [item.get("version"), *(item.get("stages") or []), *(item.get("tags") or [])]
                    if isinstance(t, str) and SEGMENT.match(t)}
            found = self.reader.from_assets(run, i, item.get("assets") or [], sorted(tags),
                                            str(source.get("experimentKey")), str(source.get("experimentModelName")),
                                            blobs)
            if found is not None:  # only checkpoints ckpt_track logged can be restored
                out.append(replace(found, native=replace(found.native, registry=True)))
        return out

    def next_version(self, workspace: str | None, name: str) -> str:
        """The next major version of registry model ``name``: ``1.0.0``, ``2.0.0``, ..."""
        ws = self.sdk.workspace(workspace)
        with self.sdk.calling(f"reading registry model {name!r}"):
            api = self.sdk.api()
            known = name in (api.get_registry_model_names(ws) or [])
            versions = api.get_registry_model_versions(ws, name) if known else []
        return f"{max((semver(v)[0] for v in versions), default=0) + 1}.0.0"
