"""The Protocol mapping of the W&B backend: options, run identity and resume policy, and the
delegation of every read and write to the mode chosen once in ``__init__`` (online, offline,
disabled: :mod:`.online`, :mod:`.offline`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ...errors import BackendError, CheckpointNotFound, ConfigError, InvalidRef
from ...format import LocalCheckpoint
from ...options import option_names, parse_options
from ...plan import by_name, resume_decision
from ...records import Capability, RunInfo, RunSpec, Stored
from ...refs import Ref
from .._store import new_run_id
from . import refs
from .common import Found, WandbRun, WandbVersion, metadata
from .live import LiveRuns
from .offline import DisabledMode, OfflineMode
from .online import OnlineMode
from .sdk import Sdk
from .settings import project_for, read_defaults

__all__ = ["Mode", "WandbBackend", "WandbOptions"]

_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
_KEY_NOTE = " (the API key is read from WANDB_API_KEY, never from settings)"


@dataclass(frozen=True)
class WandbOptions:
    """The ``[wandb]`` keys (the API key is never one: ``WANDB_API_KEY``)."""

    # Each default is W&B's own setting when it has one (environment or settings file: settings.py)
    entity: str | None = None  # default: $WANDB_ENTITY, else the API key's default entity
    project: str | None = None  # default: ct.init(project=...), else $WANDB_PROJECT
    mode: str | None = None  # online | offline | disabled; default: $WANDB_MODE, else online
    dir: str | None = None  # where wandb/ is created; default: $WANDB_DIR, else the working directory
    base_url: str | None = None  # a self-hosted server; default: $WANDB_BASE_URL, else the W&B cloud
    registry: str | None = None  # a registry collection each `best` checkpoint is linked into


class Mode(Protocol):
    """Where a mode keeps checkpoints: the W&B server (online) or the local store (offline,
    disabled).  The backend decides run identity and resume policy; the mode carries them out."""

    name: str

    def entity_for(self, given: str | None) -> str | None: ...
    def lookup(self, entity: str | None, project: str, wanted: str, by_name: bool) -> Found | None: ...
    def start(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, resumed: bool) -> Any: ...
    def opened(self, project: str, run_id: str, entity: str | None, name: str | None,
               config: dict[str, Any]) -> None: ...
    def missing_run(self, project_path: str, wanted: str) -> str: ...
    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: list[str], meta: dict[str, Any]) -> Stored: ...
    def list(self, run: RunInfo) -> list[Stored]: ...
    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]: ...
    def sweep(self, run: RunInfo) -> None: ...
    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint: ...
    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None: ...
    def delete(self, stored: Stored) -> None: ...
    def link_input(self, run: RunInfo, source: Stored, record: dict[str, str]) -> None: ...


def _mode(raw: str | None) -> str:
    value = str(raw or "online").lower()
    if value not in _MODES:
        raise ConfigError(f"wandb backend: mode {value!r} is not one of 'online', 'offline', 'disabled'")
    return _MODES[value]


class WandbBackend:
    """Checkpoints as versions of a W&B model artifact, one collection per run."""

    name: ClassVar[str] = "wandb"
    options: ClassVar[frozenset[str]] = option_names(WandbOptions)
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {Capability.DELETE, Capability.CHOOSE_RUN_ID, Capability.DEDUP})

    def __init__(self, options: Any = None) -> None:
        opts = parse_options(WandbOptions, options, backend=self.name, note=_KEY_NOTE)
        sdk = read_defaults()
        self.mode: str = _mode(opts.mode or sdk.mode)
        self.entity: str | None = opts.entity or sdk.entity
        self.project: str | None = opts.project
        self.sdk_project = sdk.project
        self.dir = Path(opts.dir or sdk.dir or ".").expanduser().absolute()
        self.base_url: str | None = (opts.base_url or sdk.base_url or "").rstrip("/") or None
        self.registry: str | None = opts.registry
        self._sdk = Sdk(self.base_url)
        self._live = LiveRuns(self.mode, self.base_url or "")
        self._impl: Mode = self._make_mode()

    def _make_mode(self) -> Mode:
        if self.mode == "online":
            return OnlineMode(self._sdk, self._live, entity=self.entity, directory=self.dir, registry=self.registry)
        if self.mode == "offline":
            return OfflineMode(self._sdk, self._live, directory=self.dir)
        return DisabledMode(self._sdk, self._live, directory=self.dir)

    def _info(self, entity: str | None, project: str, run_id: str, name: str | None, resumed: bool) -> RunInfo:
        path = "/".join(p for p in (entity, project, run_id) if p)
        params = (("base_url", self.base_url),) if self.base_url else ()
        return RunInfo(backend=self.name, project=project, run_id=run_id, name=name or run_id,
                       ref=Ref(self.name, path, params=params), resumed=resumed,
                       native=WandbRun(entity or "", self.mode))

    # -- runs ---------------------------------------------------------------------------
    def open_run(self, spec: RunSpec) -> RunInfo:
        project = project_for(self.project, spec.project, self.sdk_project)
        for what, value in (("project", project), ("run id", spec.run_id)):
            if value is not None and not refs.SEGMENT.match(value):
                raise ConfigError(f"W&B {what} {value!r} may only hold letters, digits, '_', '.', '-'")
        entity = self._impl.entity_for(self.entity)
        run_id, resumed, name = self._existing(spec, entity, project)
        live = self._live.get(project, run_id) if run_id else None  # already open here: share it
        if live is None:
            live = self._impl.start(spec, entity, project, run_id, resumed)
        if live is not None:
            run_id, entity, name = str(live.id), (live.entity or entity), (live.name or name)
        run_id = run_id or new_run_id()
        self._impl.opened(project, run_id, entity, name, dict(spec.config))
        if live is not None:
            self._live.hold(project, run_id, live)
        return self._info(entity, project, run_id, name, resumed)

    def _existing(self, spec: RunSpec, entity: str | None, project: str) -> tuple[str | None, bool, str | None]:
        """The run id to use, whether that run already exists (per ``spec.resume``), and its name."""
        found: Found | None = None
        if spec.run_id is not None:
            found = self._impl.lookup(entity, project, spec.run_id, by_name=False)
        elif by_name(spec):
            found = self._impl.lookup(entity, project, spec.name or "", by_name=True)
        named = "" if spec.run_id is not None else "named "
        decision = resume_decision(
            spec, found is not None, what=f"W&B run {spec.run_id or spec.name!r} in project {project!r}",
            missing=lambda: f"no W&B run {named}{spec.run_id or spec.name!r} in project {project!r} to resume")
        if decision == "attach":
            assert found is not None
            return found[0], True, spec.name or found[1]
        return spec.run_id, False, spec.name

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) not in (2, 3):
            raise InvalidRef(f"{ref}: a W&B reference names [entity/]project/run: wandb://<entity>/<project>/<run id>")
        given, project, wanted = (None, *segs) if len(segs) == 2 else segs
        entity = self._impl.entity_for(given)
        found = (self._impl.lookup(entity, project, wanted, by_name=False)
                 or self._impl.lookup(entity, project, wanted, by_name=True))
        if found is None or (entity and found[2] and found[2] != entity):
            raise CheckpointNotFound(self._impl.missing_run("/".join(filter(None, (entity, project))), wanted))
        run_id, name, found_entity = found
        return self._info(found_entity or None, project, run_id, name, resumed=True)

    def list_projects(self) -> list[str]:
        """The projects that hold ckpt_track runs (offline and disabled: the local store)."""
        return self._lister().list_projects()

    def list_runs(self, project: str) -> list[RunInfo]:
        """The runs of ``project`` that hold ckpt_track checkpoints, oldest first; each one
        as :meth:`find_run` returns it.  ``CheckpointNotFound`` for an unknown project."""
        return [self._info(entity or None, project, run_id, name, resumed=True)
                for run_id, name, entity in self._lister().list_runs(project)]

    def _lister(self) -> OfflineMode:
        if not isinstance(self._impl, OfflineMode):
            raise BackendError("listing W&B projects and runs reads the local store of mode = \"offline\" or "
                               "\"disabled\"; online, open them in the W&B UI")
        return self._impl

    # -- checkpoints --------------------------------------------------------------------
    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        return self._impl.put(run, ckpt, sorted(set(aliases)), metadata(ckpt, run.ref))

    def list(self, run: RunInfo) -> list[Stored]:
        return self._impl.list(run)

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """Versions left out of :meth:`list` because their manifest is damaged (offline store)."""
        return self._impl.damaged(run)

    def sweep(self, run: RunInfo) -> None:
        """Remove what killed writers left in the offline store (``RunDir.sweep``)."""
        self._impl.sweep(run)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        return self._impl.get(stored, dest)

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        self._impl.set_aliases(stored, aliases)

    def delete(self, stored: Stored) -> None:
        self._impl.delete(stored)

    def link_input(self, run: RunInfo, source: Stored) -> None:
        artifact = source.native.artifact if isinstance(source.native, WandbVersion) else ""
        self._impl.link_input(run, source, {"resumed_from": str(source.ref), "resumed_from_artifact": artifact})

    def finish_run(self, run: RunInfo) -> None:
        live = self._live.release(run.project, run.run_id)
        if live is not None:
            with self._sdk.errors(f"finishing W&B run {run.ref}"):
                live.finish()

    def close(self) -> None:
        """Finish every W&B run this instance opened and did not finish (e.g. in a notebook)."""
        for project, run_id in self._live.held():
            self.finish_run(RunInfo(self.name, project, run_id, run_id, Ref(self.name, f"{project}/{run_id}")))

    # -- references ---------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return refs.parse_ref(text)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return refs.REF_FORMS
