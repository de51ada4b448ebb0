"""The Protocol mapped onto Comet experiments: options, which experiment a run is (found by
key, by ckpt_track run id or by name; Comet keeps one live experiment per process, and the
user's own is logged into rather than ended), and the calls that are the same online and
offline.  Where checkpoints are read back from is the mode, chosen once in ``__init__``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...errors import BackendError, BackendNotInstalled, CheckpointNotFound, ConfigError, InvalidRef
from ...format import LocalCheckpoint
from ...options import option_names, parse_options
from ...plan import by_name, resume_decision
from ...records import Capability, RunInfo, RunSpec, Stored
from ...refs import Ref
from . import refs
from .handles import RESUMED_FROM_KEY, RUN_ID_KEY, CometRegistryModel, CometRun, Found
from .mode import Mode
from .offline import OfflineMode
from .online import OnlineMode
from .sdk import CometSdk
from .settings import project_for, read_defaults

__all__ = ["CometBackend", "CometOptions"]

_ours: weakref.WeakSet[Any] = weakref.WeakSet()  # experiments ckpt_track started, as opposed to the user's


@dataclass(frozen=True)
class CometOptions:
    """The ``[comet]`` section (the API key is never one: COMET_API_KEY or ``comet login``)."""

    # Each default is comet_ml's own setting when it has one (see settings.py)
    workspace: str | None = None  # default: $COMET_WORKSPACE, else the API key's default (online) / none
    project: str | None = None  # default: ct.init(project=...), else $COMET_PROJECT_NAME
    online: bool | None = None  # default: $COMET_START_ONLINE, else not $COMET_OFFLINE, else true
    offline_directory: str | None = None  # default: $COMET_OFFLINE_DIRECTORY or ./.cometml-runs
    url: str | None = None  # a self-hosted server's root; default: $COMET_URL_OVERRIDE, else comet.com
    register_as: str | None = None  # also register every checkpoint in this registry model


class CometBackend:
    """Checkpoints as Comet experiment models, online or offline (see the package docstring)."""

    name: ClassVar[str] = "comet"
    options: ClassVar[frozenset[str]] = option_names(CometOptions)
    capabilities: ClassVar[frozenset[str]] = frozenset({Capability.DELETE, Capability.DEDUP})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = parse_options(CometOptions, options, backend=self.name,
                             note="; the API key is read from COMET_API_KEY, never from the settings")
        self.url = refs.server_root(opts.url)
        self.sdk = CometSdk(self.url)
        if opts.online is not None and not isinstance(opts.online, bool):
            raise ConfigError(f"[comet] online must be true or false, got {opts.online!r}")
        sdk = read_defaults(self._sdk_if_installed())
        online = opts.online if opts.online is not None else (True if sdk.online is None else sdk.online)
        # run ids derive experiment keys from the [comet] workspace alone: stable across releases
        self._key_workspace = None if opts.workspace is None else refs.segment(opts.workspace, "workspace")
        workspace = opts.workspace or sdk.workspace
        self.workspace = None if workspace is None else refs.segment(workspace, "workspace")
        self.project = None if opts.project is None else refs.segment(opts.project, "project")
        self.sdk_project = sdk.project
        self.register_as = refs.registry_name(opts.register_as)
        root = opts.offline_directory or sdk.offline_directory or ".cometml-runs"
        self.offline_directory = Path(root).expanduser().absolute()
        self.mode: Mode = (OnlineMode(self.sdk, self.workspace) if online
                           else OfflineMode(self.sdk, self.offline_directory))
        self._open: dict[str, tuple[Any, bool]] = {}  # key -> (experiment, started by us)
        self._lock = threading.RLock()

    def _sdk_if_installed(self) -> Any | None:
        """comet_ml, or None when it is not installed (its settings are then unknown)."""
        try:
            return self.sdk.imported()
        except BackendNotInstalled:
            return None

    def _sdk(self) -> Any:
        """comet_ml (imported on first use; tests check it leaves the global random generator alone)."""
        return self.sdk.module()

    # -- runs ------------------------------------------------------------------------------
    def _derive_key(self, project: str, run_id: str) -> str:
        """A run id as an experiment key, the same in every process (Comet keys are global)."""
        if refs.KEY.match(run_id):
            return run_id
        return hashlib.sha256(f"ckpt_track/{self._key_workspace or ''}/{project}/{run_id}".encode()).hexdigest()[:32]

    def _info(self, f: Found, resumed: bool) -> RunInfo:
        segs = [s for s in (f.workspace, f.project, f.key) if s]
        path = "/".join(segs) if all(refs.SEGMENT.match(s) for s in segs) else f.key
        ref = Ref(self.name, path, params=self.sdk.ref_params())
        return RunInfo(backend=self.name, project=f.project, run_id=f.run_id or f.key, name=f.name or f.run_id or f.key,
                       ref=ref, resumed=resumed, native=CometRun(f.key, f.workspace))

    def _lookup(self, workspace: str | None, project: str | None, wanted: str, names: bool = True) -> Found | None:
        """An existing experiment by key, by ckpt_track run id, or (``names``) by name in
        ``workspace`` (default: the configured one)."""
        keys = {wanted} if refs.KEY.match(wanted) else set()
        if project is not None:
            keys.add(self._derive_key(project, wanted))
        for key in sorted(keys):
            if (found := self.mode.by_key(key)) is not None:
                return found
        return self.mode.by_name(project, wanted, workspace) if project is not None and names else None

    def open_run(self, spec: RunSpec) -> RunInfo:
        project = refs.segment(project_for(self.project, spec.project, self.sdk_project), "project")
        comet_ml = self.sdk.module()
        self.mode.ready()
        running = comet_ml.get_running_experiment()
        if running is not None and running.alive and not running.ended and running not in _ours:
            return self._adopt(comet_ml, running, spec, project)
        found = None
        if spec.run_id is not None:
            found = self._lookup(None, project, refs.segment(spec.run_id, "run id"), names=False)
        elif by_name(spec):
            found = self.mode.by_name(project, str(spec.name))
        wanted = str(spec.run_id or spec.name)
        decision = resume_decision(spec, found is not None, what=f"run {wanted!r} in Comet project {project!r}",
                                   missing=lambda: self.mode.not_found(wanted, project))
        if decision == "attach" and found is not None:
            return self._info(self._start(found, create=False), resumed=True)
        key = self._derive_key(project, spec.run_id) if spec.run_id else uuid.uuid4().hex
        if spec.run_id is None and spec.name is None:
            self.mode.by_key(key)  # one lookup first: online, a wrong key or a dead server fail clearly
        new = Found(key, self.workspace, project, spec.name or spec.run_id, spec.run_id)
        return self._info(self._start(new, create=True, config=spec.config), resumed=False)

    def _start(self, f: Found, create: bool, config: Mapping[str, Any] | None = None) -> Found:
        """Create or re-attach the experiment this process logs to (Comet keeps one per process)."""
        comet_ml = self.sdk.module()
        with self.sdk.calling(f"starting experiment {f.key}"):
            exp = self.mode.experiment(comet_ml, f, create)
            _ours.add(exp)
            if create:
                if f.name:
                    exp.set_name(f.name)
                exp.add_tag("ckpt_track")
                if f.run_id:
                    exp.log_other(RUN_ID_KEY, f.run_id)
                if config:
                    exp.log_parameters(dict(config))
                self.mode.published(exp)
        self._open[f.key] = (exp, True)
        self.mode.new_session(f.key, create)
        if create:
            self.mode.record_run(f, config)
        return self.mode.resolve(f)

    def _adopt(self, comet_ml: Any, exp: Any, spec: RunSpec, project: str) -> RunInfo:
        """Log into the experiment the user started: starting another would end theirs."""
        offline = isinstance(exp, comet_ml.OfflineExperiment)
        key = exp.get_key()
        if offline == self.mode.online:
            raise ConfigError(f"a Comet {'offline' if offline else 'online'} experiment ({key}) is running in "
                              f"this process; set [comet] online = {str(not offline).lower()} to log checkpoints "
                              "into it, or end() it before ckpt_track.init")
        if spec.run_id is not None and self._derive_key(project, spec.run_id) != key:
            raise ConfigError(f"run_id={spec.run_id!r} is not the Comet experiment {key} already running in this "
                              "process (Comet allows one); drop run_id= or end() it first")
        f = Found(key, exp.workspace or self.workspace, exp.project_name or project, exp.name or spec.name,
                  spec.run_id)
        self._open[key] = (exp, False)
        self.mode.new_session(key, create=False)
        self.mode.record_run(f, spec.config)
        resumed = isinstance(exp, (comet_ml.ExistingExperiment, comet_ml.ExistingOfflineExperiment))
        return self._info(self.mode.resolve(f), resumed=resumed)

    def _live(self, key: str) -> Any | None:
        """The experiment of ``key`` this process is logging to, None once it ended."""
        exp, _ = self._open.get(key, (None, False))
        return exp if exp is not None and exp.alive and not exp.ended else None

    def _exp(self, run: RunInfo) -> Any:
        """The live experiment of ``run``, re-attached if it ended (finished, or another run started)."""
        key = run.native.key
        if (exp := self._live(key)) is not None:
            return exp
        if not self._open.get(key, (None, True))[1]:
            raise BackendError(f"the Comet experiment {key} you started has ended; start it again before "
                               "logging more checkpoints")
        self._start(Found(key, run.native.workspace, run.project, None, None), create=False)
        return self._open[key][0]

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        if len(segs) == 3 and segs[0] == "registry":
            return self.mode.registry().run(segs[1], segs[2])
        if not 1 <= len(segs) <= 3:
            raise InvalidRef(f"{ref}: a Comet reference names [<workspace>/]<project>/<experiment key or name>, "
                             "or registry/<workspace>/<model>")
        project = segs[-2] if len(segs) >= 2 else None
        with self._lock:
            found = self._lookup(segs[0] if len(segs) == 3 else None, project, segs[-1])
        if found is None:
            raise CheckpointNotFound(self.mode.not_found(segs[-1], project))
        return self._info(found, resumed=True)

    def list_projects(self) -> list[str]:
        """The projects that hold ckpt_track experiments (offline: the offline store)."""
        return self._lister().list_projects()

    def list_runs(self, project: str) -> list[RunInfo]:
        """The experiments of ``project`` that hold ckpt_track checkpoints, oldest first; each
        one as :meth:`find_run` returns it.  ``CheckpointNotFound`` for an unknown project."""
        return [self._info(f, resumed=True) for f in self._lister().list_runs(project)]

    def _lister(self) -> OfflineMode:
        if not isinstance(self.mode, OfflineMode):
            raise BackendError("listing Comet projects and experiments reads the offline store "
                               "([comet] online = false); online, open them in Comet's UI")
        return self.mode

    # -- checkpoints ------------------------------------------------------------------------
    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        with self._lock:
            return self.mode.put(run, self._exp(run), ckpt, aliases, self.register_as)

    def list(self, run: RunInfo) -> list[Stored]:
        if isinstance(run.native, CometRegistryModel):
            return self.mode.registry().list(run)
        return self.mode.list(run)

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """Versions left out of :meth:`list` because their manifest is damaged (offline store)."""
        return {} if isinstance(run.native, CometRegistryModel) else self.mode.damaged(run)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        return self.mode.get(stored, Path(dest))

    def _writable(self, stored: Stored) -> str:
        if isinstance(stored.run.native, CometRegistryModel):
            raise BackendError(f"{stored.ref}: registry versions are read-only here; change them in Comet's "
                               "model registry")
        return str(stored.run.native.key)

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        key = self._writable(stored)
        with self._lock:
            self.mode.set_aliases(stored, self._live(key), aliases)

    def delete(self, stored: Stored) -> None:
        key = self._writable(stored)
        with self._lock:
            self.mode.delete(stored, self._live(key))

    def link_input(self, run: RunInfo, source: Stored) -> None:
        self.mode.link_input(run, source)
        self.mode.log_other(self._live(run.native.key), run.native.key, RESUMED_FROM_KEY, str(source.ref))

    def finish_run(self, run: RunInfo) -> None:
        key = str(getattr(run.native, "key", None))
        exp, ours = self._open.pop(key, (None, False))
        if exp is not None:
            with self.sdk.calling(f"ending experiment {key}"):
                if ours:
                    exp.end()  # offline: writes <key>.zip for `comet upload`
                else:
                    self.mode.leave(exp)  # the user's experiment: theirs to end

    def close(self) -> None:
        """End every experiment this backend started (for tests and long-lived processes)."""
        for key in list(self._open):
            exp, ours = self._open.pop(key)
            if ours and not exp.ended:
                with self.sdk.calling(f"ending experiment {key}"):
                    exp.end()

    # -- references -------------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return refs.parse_ref(text)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return refs.REF_FORMS

