"""``mode = "online"``: every read and write goes to the W&B server.  Checkpoints are versions of
the run's artifact ``ckpt-<run id>`` (numbered by the server), aliases are W&B's own, ``get``
downloads one version into the core's download cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ... import cache
from ...errors import CheckpointNotFound
from ...format import LocalCheckpoint
from ...records import RunInfo, RunSpec, Stored
from .common import Found, WandbRun, WandbVersion, artifact_path, sent_bytes, to_stored
from .live import LiveRuns, live_run
from .refs import ARTIFACT_PREFIX
from .sdk import Sdk

__all__ = ["OnlineMode"]


class OnlineMode:
    """The W&B server is the store."""

    name = "online"

    def __init__(self, sdk: Sdk, live: LiveRuns, *, entity: str | None, directory: Path,
                 registry: str | None) -> None:
        self.sdk, self.live, self.entity = sdk, live, entity
        self.directory, self.registry = directory, registry

    # -- runs -------------------------------------------------------------------------------
    def entity_for(self, given: str | None) -> str:
        """The entity of a run: ``given``, else the configured one, else the API key's default."""
        return given or self.entity or self.sdk.default_entity()

    def lookup(self, entity: str | None, project: str, wanted: str, by_name: bool) -> Found | None:
        """(run id, name, entity) of an existing run, by id or by display name (newest)."""
        from ._compat import RunNotFoundError, is_missing_project

        api = self.sdk.api()
        with self.sdk.errors(f"looking up W&B run {wanted!r}"):
            if not by_name:
                try:
                    r = api.run(f"{entity}/{project}/{wanted}")
                except RunNotFoundError:
                    return None
                return str(r.id), str(r.name or r.id), str(r.entity)
            try:
                for r in api.runs(f"{entity}/{project}", filters={"displayName": wanted}, order="-created_at"):
                    return str(r.id), str(r.name or r.id), str(r.entity)
            except ValueError as exc:  # how the SDK says the project has no runs yet
                if not is_missing_project(exc):
                    raise
        return None

    def start(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, resumed: bool) -> Any:
        resume = "must" if resumed else ("never" if run_id is not None else None)
        return self.sdk.start(spec, entity, project, run_id, mode=self.name, directory=self.directory,
                              resume=resume)

    def opened(self, project: str, run_id: str, entity: str | None, name: str | None,
               config: dict[str, Any]) -> None:
        return None  # the server has the run

    def missing_run(self, project_path: str, wanted: str) -> str:
        return f"no W&B run {wanted!r} in project {project_path} on {self.sdk.where}"

    # -- checkpoints ------------------------------------------------------------------------
    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: list[str], meta: dict[str, Any]) -> Stored:
        live = live_run(self.live, run)
        held = self._held_digests(run)  # before logging: afterwards `latest` is this version
        logged, files = self.sdk.log(live, run.run_id, ckpt.path, ckpt, aliases, meta, wait=True,
                                     registry=self.registry)
        stored = to_stored(run, int(str(logged.version).lstrip("v")) + 1, meta, aliases)
        return replace(stored, uploaded=sent_bytes(files.items(), held))

    def _held_digests(self, run: RunInfo) -> set[str]:
        """MD5 digests of the files of the run's newest artifact version (``latest``): the
        files W&B will not upload again."""
        name = artifact_path(run, "latest")
        try:
            with self.sdk.errors(f"reading the manifest of {name}"):
                return {str(e.digest) for e in self.sdk.api().artifact(name).manifest.entries.values()}
        except CheckpointNotFound:
            return set()  # the run's first checkpoint

    def list(self, run: RunInfo) -> list[Stored]:
        name = f"{ARTIFACT_PREFIX}{run.run_id}"
        entity = run.native.entity if isinstance(run.native, WandbRun) else ""
        out = []
        with self.sdk.errors(f"listing the checkpoints of {run.ref}"):
            remote = self.sdk.api().run(f"{entity}/{run.project}/{run.run_id}")
            for art in remote.logged_artifacts():
                collection, _, index = str(art.name).partition(":")
                meta = art.metadata or {}
                if art.type != "model" or collection != name or "step" not in meta:
                    continue  # another artifact of the run, or not one of ours
                out.append(to_stored(run, int(index.lstrip("v")) + 1, meta, list(art.aliases)))
        return sorted(out, key=lambda s: s.version)

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        return {}  # W&B verifies its own artifacts; the core verifies every download

    def sweep(self, run: RunInfo) -> None:
        return None  # W&B commits an artifact version whole: nothing half-made to remove

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        handle: WandbVersion = stored.native

        def own(into: Path) -> None:  # every file: each W&B version is self-contained
            with self.sdk.errors(f"downloading {handle.artifact}"):
                self.sdk.api().artifact(handle.artifact).download(root=str(into), skip_cache=True)

        # the manifest hash tells this version from another one cached under the same path
        return cache.fetch(Path(dest), own, manifest_hash=handle.manifest_xxh3, where=handle.artifact)

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        handle: WandbVersion = stored.native
        with self.sdk.errors(f"setting aliases {sorted(aliases)} on {handle.artifact}"):
            art = self.sdk.api().artifact(handle.artifact)
            art.aliases = sorted(set(art.aliases) | set(aliases))
            art.save()  # W&B moves each alias off the version that held it
            live = self.live.get(stored.run.project, stored.run.run_id)
            if self.registry and "best" in aliases and live is not None:
                self.sdk.link(live, art, self.registry)

    def delete(self, stored: Stored) -> None:
        handle: WandbVersion = stored.native
        with self.sdk.errors(f"deleting {handle.artifact}"):
            self.sdk.api().artifact(handle.artifact).delete(delete_aliases=True)

    def link_input(self, run: RunInfo, source: Stored, record: dict[str, str]) -> None:
        live = self.live.get(run.project, run.run_id)
        if live is None:
            return
        with self.sdk.errors(f"recording in W&B that {run.ref} resumes from {source.ref}"):
            if record["resumed_from_artifact"]:
                live.use_artifact(record["resumed_from_artifact"])  # an edge in W&B's lineage graph
            live.config.update({"ckpt_track": record}, allow_val_change=True)
