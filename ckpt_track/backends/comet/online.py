"""Online: ``Experiment`` writes, the REST ``API`` reads.  The alias table, the highest version
used and the tombstones are the ``ckpt_track.state`` other (this backend is the experiment's
only writer, so it is read once and then kept); ``put`` returns only once Comet holds every
file of the checkpoint; ``get`` fills the core's download cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ... import cache
from ...errors import BackendUnavailable, CheckpointNotFound, IntegrityError
from ...format import LocalCheckpoint, check_name, is_blob
from ...plan import next_version, unreferenced
from ...records import RunInfo, Stored
from .assets import ModelReader
from .handles import RUN_ID_KEY, STATE_KEY, AliasState, CometModel, Found, checkpoint_meta
from .handles import stored as make_stored
from .mode import Mode
from .model_registry import ModelRegistry
from .refs import MODEL, model_name
from .sdk import CometSdk
from .upload import blobs_to_send, log_checkpoint, register, uploaded_bytes

__all__ = ["OnlineMode"]


class OnlineMode(Mode):
    """Checkpoints as models of experiments on a Comet server."""

    online: ClassVar[bool] = True

    def __init__(self, sdk: CometSdk, workspace: str | None) -> None:
        super().__init__()
        self.sdk = sdk
        self.workspace = workspace  # [comet] workspace; None: the API key's default
        self.reader = ModelReader(sdk)
        self._states: dict[str, AliasState] = {}  # we are the experiment's only writer
        self._models: dict[tuple[str, str], list[dict[str, Any]]] = {}  # complete models never change
        self._registry: ModelRegistry | None = None

    # -- experiments ----------------------------------------------------------------------
    def ready(self) -> None:
        self.sdk.api()  # checks the key before anything starts

    def by_key(self, key: str) -> Found | None:
        with self.sdk.calling(f"looking up experiment {key}"):
            exp = self.sdk.lookup(key)
            if exp is None:
                return None
            others = {o["name"]: o.get("valueCurrent") for o in exp.get_others_summary() or []}
        self._states.setdefault(key, AliasState.load(others.get(STATE_KEY), f"experiment {key}"))
        return Found(key, exp.workspace, exp.project_name, exp.name, others.get(RUN_ID_KEY))

    def by_name(self, project: str, name: str, workspace: str | None = None) -> Found | None:
        ws = self.sdk.workspace(workspace or self.workspace)
        with self.sdk.calling(f"looking up experiment {name!r} in {ws}/{project}"):
            exp = self.sdk.api().get_experiment(ws, project, name)  # by key, then by name
        return None if exp is None else self.by_key(exp.id)

    def not_found(self, wanted: str, project: str | None) -> str:
        return (f"no Comet experiment {wanted!r} in project {project!r} on {self.sdk.where()}; "
                "offline runs need [comet] online = false until uploaded")

    def experiment(self, comet_ml: Any, found: Found, create: bool) -> Any:
        exp = (comet_ml.Experiment(workspace=found.workspace, project_name=found.project, experiment_key=found.key)
               if create else comet_ml.ExistingExperiment(experiment_key=found.key))
        if not exp.alive:  # the SDK logs handshake failures instead of raising them
            raise BackendUnavailable(f"{self.sdk.where()} did not start experiment {found.key} (see the COMET "
                                     "ERROR above); check the network, [comet] url, workspace and project")
        return exp

    def published(self, exp: Any) -> None:
        exp.flush()  # the name must be searchable before the first checkpoint

    def resolve(self, found: Found) -> Found:
        return found if found.workspace else replace(found, workspace=self.sdk.workspace(self.workspace))

    def leave(self, exp: Any) -> None:
        exp.flush()

    def log_other(self, exp: Any | None, key: str, name: str, value: str) -> None:
        """On the live experiment (and flushed), else by REST."""
        with self.sdk.calling(f"logging {name} to experiment {key}"):
            if exp is None:
                self.sdk.experiment(key).log_other(name, value)
                return
            exp.log_other(name, value)
            if not exp.flush():
                raise BackendUnavailable(f"{self.sdk.where()} did not take {name} of experiment {key} in time")

    def registry(self) -> ModelRegistry:
        if self._registry is None:
            self._registry = ModelRegistry(self.sdk, self.reader)
        return self._registry

    def registry_version(self, name: str) -> str | None:
        return self.registry().next_version(self.workspace, name)

    # -- the state other --------------------------------------------------------------------
    def state(self, key: str) -> AliasState:
        if key not in self._states:
            with self.sdk.calling(f"reading {STATE_KEY} of experiment {key}"):
                values = self.sdk.experiment(key).get_others_summary(STATE_KEY)
            self._states[key] = AliasState.load(values[-1] if values else None, f"experiment {key}")
        return self._states[key]

    def _save_state(self, run: RunInfo, exp: Any | None, state: AliasState) -> None:
        self.log_other(exp, run.native.key, STATE_KEY, state.dump())
        self._states[run.native.key] = state

    # -- checkpoints --------------------------------------------------------------------------
    def put(self, run: RunInfo, exp: Any, ckpt: LocalCheckpoint, aliases: Sequence[str],
            register_as: str | None) -> Stored:
        key, m = run.native.key, ckpt.manifest
        state = self.state(key)
        version = next_version([*state.deleted, *self._versions(key)], state.last_version)
        name = model_name(version, m.step)
        meta = checkpoint_meta(version, ckpt, aliases, run.ref)
        new_blobs = blobs_to_send(m, self.blobs_held(key))
        new_state = state.point(aliases, version)
        try:
            with self.sdk.calling(f"logging checkpoint v{version} (step {m.step}) to experiment {key}"):
                log_checkpoint(exp, ckpt.path, name, meta, m, new_blobs)
                native = self._uploaded(run, exp, version, name)
                if register_as:  # only a complete model; registered by the flush below
                    register(exp, name, register_as, self.registry_version(register_as), aliases,
                             str(run.ref.select(version=version)))
                self._save_state(run, exp, new_state)  # the aliases move only once every file is stored
        except BaseException:
            self._states.pop(key, None)
            self.held.pop(key, None)  # unsure what arrived: ask again
            raise
        return replace(make_stored(run, version, meta, new_state.aliases_of(version), native),
                       uploaded=uploaded_bytes(meta, new_blobs))

    def blobs_held(self, key: str) -> dict[str, int]:
        """Blob -> size of the content-addressed files the experiment already holds."""
        if key not in self.held:
            self.held[key] = {f: size for f, size, _ in self.reader.blob_assets(key)}
        return self.held[key]

    def _versions(self, key: str) -> list[int]:
        """Every version number in use, also of half-uploaded models, so none is ever reused."""
        with self.sdk.calling(f"listing the models of experiment {key}"):
            names = self.sdk.experiment(key).get_model_names() or []
        return [int(m.group(1)) for n in names if (m := MODEL.match(n))]

    def _uploaded(self, run: RunInfo, exp: Any, version: int, name: str) -> CometModel:
        """Wait for the upload, then check that Comet holds every file (flush() can succeed without)."""
        key = run.native.key
        if not exp.flush():
            raise BackendUnavailable(f"{self.sdk.where()} did not receive checkpoint {name} of experiment {key} "
                                     "in time; it is kept in the local spool")
        assets = self.sdk.experiment(key).get_model_asset_list(name) or []
        blobs = {key: self.reader.blob_assets(key)}
        self.held[key] = {f: size for f, size, _ in blobs[key]}
        found = self.reader.from_assets(run, version, assets, (), key, name, blobs)
        if found is None:
            raise BackendUnavailable(f"{self.sdk.where()} holds only part of checkpoint {name} of experiment {key} "
                                     "(see the COMET ERROR above); it is kept in the local spool")
        self._models[(key, name)] = assets
        return found.native

    def list(self, run: RunInfo) -> list[Stored]:
        key = run.native.key
        state = self.state(key)
        out = []
        blobs: dict[str, list[tuple[str, int, str]]] = {}
        with self.sdk.calling(f"listing the checkpoints of experiment {key}"):
            exp = self.sdk.experiment(key)
            for name in exp.get_model_names() or []:
                match = MODEL.match(name)
                if not match or int(match.group(1)) in state.deleted:
                    continue
                assets = self._models.get((key, name)) or exp.get_model_asset_list(name) or []
                v = int(match.group(1))
                found = self.reader.from_assets(run, v, assets, state.aliases_of(v), key, name, blobs)
                if found is not None:
                    self._models[(key, name)] = assets
                    out.append(found)
        return sorted(out, key=lambda s: s.version)

    def _assets_of(self, stored: Stored) -> tuple[Any, dict[str, str], set[str]]:
        """The APIExperiment holding a version, its asset id per file name, and which files are
        shared blob assets rather than elements of the version's model."""
        native = stored.native
        exp = self.sdk.experiment(native.experiment)
        if isinstance(native, CometModel):
            return exp, native.ids, set(native.shared)
        found = self.reader.from_assets(stored.run, stored.version, exp.get_model_asset_list(native.model) or [],
                                        (), native.experiment, native.model)
        if found is None:  # e.g. a checkpoint put offline, read back after `comet upload`
            raise CheckpointNotFound(f"{stored.ref}: model {native.model} of experiment {native.experiment} "
                                     "is incomplete")
        return exp, found.native.ids, set(found.native.shared)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        """Through the core's download cache: the small files first, then the tensor files no
        earlier download of this run holds (asked of Comet only when the cache misses)."""
        where = f"downloading {stored.ref}"
        found: dict[str, Any] = {}

        def own(into: Path) -> None:
            with self.sdk.calling(where):
                exp, ids, _ = self._assets_of(stored)
                found.update(exp=exp, ids=ids)
                for fname in ids:
                    check_name(fname, str(stored.ref))
                for fname in sorted(f for f in ids if not is_blob(f)):
                    self.sdk.download_asset(exp, ids[fname], into / fname)

        def blobs(names: Sequence[str], into: Path) -> None:
            with self.sdk.calling(where):
                for fname in sorted(names):
                    if fname not in found["ids"]:
                        raise IntegrityError(f"{stored.ref}: tensor file {fname!r} is not stored in Comet")
                    self.sdk.download_asset(found["exp"], found["ids"][fname], into / fname)

        return cache.fetch(dest, own, blobs, where=str(stored.ref))

    def set_aliases(self, stored: Stored, exp: Any | None, aliases: Sequence[str]) -> None:
        self._save_state(stored.run, exp, self.state(stored.run.native.key).point(aliases, stored.version))

    def delete(self, stored: Stored, exp: Any | None) -> None:
        key = stored.run.native.key
        # tombstone first: a half-deleted version is never listed, and an archive uploaded
        # later (still holding the files) stays consistent
        self._save_state(stored.run, exp, self.state(key).tombstone(stored.version))
        with self.sdk.calling(f"deleting {stored.ref}"):
            api_exp, ids, shared = self._assets_of(stored)
            for fname, asset_id in ids.items():
                if fname not in shared:
                    api_exp.delete_asset(asset_id)
            self._models.pop((key, stored.native.model), None)
            if not shared:
                return
            # then the blobs no remaining checkpoint names (a crash between leaves extra blobs)
            gone = set(unreferenced(shared, (s.native.shared for s in self.list(stored.run))))
            for fname, _, asset_id in self.reader.blob_assets(key):
                if fname in gone:
                    api_exp.delete_asset(asset_id)
                    self.held.get(key, {}).pop(fname, None)
