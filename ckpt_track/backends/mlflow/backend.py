"""The Protocol mapped onto MLflow 3: a run is an MLflow run, a checkpoint version one of its
LoggedModels (see the package docstring for what the UI shows).

The core decides (version numbers, which files to send, which shared files a delete may
remove, create or attach, the download cache); this class carries it out through
:class:`~.client.MlflowSdk`, inside its error boundary.
"""

from __future__ import annotations

import contextlib
import posixpath
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ... import cache
from ...errors import ConfigError, InvalidRef
from ...format import MANIFEST, LocalCheckpoint, is_blob
from ...options import option_names, parse_options
from ...plan import by_name, files_to_send, next_version, resume_decision
from ...records import Capability, RunInfo, RunSpec, Stored
from ...refs import Ref
from . import native, refs, runs
from . import settings as sdk_settings
from .blobs import RunBlobs
from .client import MlflowSdk, is_not_found, quiet_progress, uri_set_in_process
from .handles import (
    TAG_ALIAS,
    TAG_LAST_VERSION,
    TAG_REGISTERED,
    TAG_STEP,
    TAG_VERSION,
    MlflowModel,
    MlflowRun,
    millis,
    model_tags,
    stored_from,
)

__all__ = ["MlflowBackend", "MlflowOptions"]

_PARAM_MAX = 6000  # characters of one param value MLflow accepts
_PARAMS_PER_CALL = 100  # the REST API takes at most 100 params a call


@dataclass(frozen=True)
class MlflowOptions:
    """The ``[mlflow]`` section."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    experiment: str | None = None  # default: the project name
    register_as: str | None = None  # also register each checkpoint under this registry name
    artifact_location: str | None = None  # of experiments ckpt_track creates
    ui: str | None = None  # the address of a pasted UI URL: the tracking URI when none is configured


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The training config as MLflow params: nested keys dotted, values cut to what MLflow takes."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:_PARAM_MAX]
    return out


class MlflowBackend:
    """Checkpoints as MLflow 3 LoggedModels of a run."""

    name: ClassVar[str] = "mlflow"
    options: ClassVar[frozenset[str]] = option_names(MlflowOptions)
    capabilities: ClassVar[frozenset[str]] = frozenset({Capability.DELETE, Capability.REGISTRY, Capability.DEDUP})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = parse_options(MlflowOptions, options, backend=self.name,
                             note="; credentials come from MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
        # ckpt_track's settings, then the SDK's own environment, then a pasted UI URL's address
        self.sdk = MlflowSdk(sdk_settings.tracking_uri(opts.tracking_uri, opts.ui),
                             sdk_settings.registry_uri(opts.registry_uri))
        self.experiment = opts.experiment
        self.register_as = opts.register_as
        self.artifact_location = opts.artifact_location
        self.blobs = RunBlobs(self.sdk)
        quiet_progress()

    @property
    def tracking_uri(self) -> str | None:
        return self.sdk.tracking_uri

    @property
    def _client(self) -> Any:
        return self.sdk.client

    def check_configured(self) -> None:
        """Before resolving a reference: a tracking URI must be known.  MLflow's own default
        (``sqlite:///<cwd>/mlflow.db``, artifacts in ``./mlruns``) would create an empty store
        in the working directory and then report the run missing from it."""
        if self.sdk.tracking_uri is None and not uri_set_in_process():
            raise ConfigError(
                "no MLflow tracking URI is configured to look the reference up in: set MLFLOW_TRACKING_URI "
                "or [mlflow] tracking_uri (e.g. http://127.0.0.1:5000), or pass the run's MLflow UI URL"
            )
        problem = sdk_settings.databricks_credentials_problem(self.sdk.tracking_uri)
        if problem is not None:
            raise problem

    # -- runs -----------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self._client.create_experiment(name, artifact_location=self.artifact_location,
                                                      tags=native.EXPERIMENT_TAGS))
        except Exception:  # another process created it first
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _info(self, run: Any, resumed: bool) -> RunInfo:
        exp = self._client.get_experiment(run.info.experiment_id)
        return RunInfo(
            backend=self.name, project=exp.name, run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id, ref=Ref(self.name, run.info.run_id), resumed=resumed,
            native=MlflowRun(str(run.info.experiment_id), run.info.artifact_uri),
        )

    def _handle(self, run: RunInfo) -> MlflowRun:
        """The run's handle; looked up for a RunInfo this backend did not make."""
        if isinstance(run.native, MlflowRun):
            return run.native
        info = self._client.get_run(run.run_id).info
        return MlflowRun(str(info.experiment_id), info.artifact_uri)

    def _existing(self, spec: RunSpec, exp_id: str) -> Any:
        """The run ``spec`` names (by id, or by name unless a new one is asked for), or None."""
        if spec.run_id is not None:
            try:
                return self._client.get_run(spec.run_id)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                return None
        if not by_name(spec):
            return None
        found = self._client.search_runs(
            [exp_id], filter_string=f"tags.mlflow.runName = '{spec.name}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return found[0] if found else None

    def _experiment_name(self, project: str) -> str:
        return sdk_settings.experiment_name(self.experiment, project,
                                            by_id=lambda i: str(self._client.get_experiment(i).name))

    def open_run(self, spec: RunSpec) -> RunInfo:
        with self.sdk.errors(f"looking up the MLflow experiment of project {spec.project!r}"):
            experiment = self._experiment_name(spec.project)
        with self.sdk.errors(f"opening a run in experiment {experiment!r}"):
            exp_id = self._experiment_id(experiment)
            existing = self._existing(spec, exp_id)
            decision = resume_decision(
                spec, existing is not None,
                what=f"MLflow run {existing.info.run_id if existing is not None else spec.run_id}",
                missing=lambda: f"no MLflow run {spec.run_id or spec.name!r} in experiment {experiment!r} "
                                f"at {self.sdk.where}")
            if decision == "attach":
                self._client.update_run(existing.info.run_id, status="RUNNING")
                return self._info(existing, resumed=True)
            if spec.run_id is not None:
                raise ConfigError(
                    f"MLflow assigns run ids itself; run {spec.run_id!r} does not exist at {self.sdk.where}. "
                    "Use name= to find a run again, or resume='never' without run_id"
                )
            run = self._client.create_run(exp_id, run_name=spec.name, tags={runs.CKPT_TAG: "true"})
            self._log_params(run.info.run_id, spec.config)
            return self._info(run, resumed=False)

    def _log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flatten(config).items()]
        for i in range(0, len(items), _PARAMS_PER_CALL):
            self._client.log_batch(run_id, params=items[i:i + _PARAMS_PER_CALL])

    def find_run(self, ref: Ref) -> RunInfo:
        """``mlflow://<run_id>``, or ``mlflow://<experiment>/<run name>``: the newest run of that
        name (a warning names the others)."""
        segs = ref.segments
        if len(segs) == 2 and segs[0] not in ("models", "registered"):
            with self.sdk.errors(f"looking up MLflow run {segs[1]!r} of experiment {segs[0]!r}"):
                exp = runs.experiment(self._client, segs[0], self.sdk.where)
                return self._info(runs.newest_named(self._client, exp, segs[1], self.sdk.where), resumed=True)
        if len(segs) != 1:
            raise InvalidRef(f"{ref}: an MLflow run reference is mlflow://<run_id> or "
                             "mlflow://<experiment>/<run name>")
        with self.sdk.errors(f"looking up MLflow run {ref.path}"):
            return self._info(self._client.get_run(ref.path), resumed=True)

    def run_config(self, run: RunInfo) -> dict[str, str]:
        """The run's params: ``ct.init(config=...)`` flattened to dotted keys, as MLflow keeps them."""
        with self.sdk.errors(f"reading the params of MLflow run {run.run_id}"):
            return dict(self._client.get_run(run.run_id).data.params)

    def list_projects(self) -> list[str]:
        """The experiments the tracking server lists."""
        with self.sdk.errors("listing MLflow experiments"):
            return runs.experiment_names(self._client)

    def list_runs(self, project: str) -> list[RunInfo]:
        """The runs ckpt_track created in experiment ``project``, newest first."""
        with self.sdk.errors(f"listing the runs of MLflow experiment {project!r}"):
            exp = runs.experiment(self._client, project, self.sdk.where)
            return [RunInfo(backend=self.name, project=exp.name, run_id=r.info.run_id,
                            name=r.info.run_name or r.info.run_id, ref=Ref(self.name, r.info.run_id),
                            resumed=True, native=MlflowRun(str(exp.experiment_id), r.info.artifact_uri))
                    for r in runs.ckpt_runs(self._client, exp)]

    def resolve_ref(self, ref: Ref) -> Ref:
        """``models/<id>`` and ``registered/<name>`` references -> ``<run_id>:vN``."""
        return refs.resolve(self.sdk, ref)

    # -- checkpoints -------------------------------------------------------------------------
    def _models(self, run: RunInfo, pending: bool = False) -> list[Any]:
        """The run's ckpt_track models: READY ones, and with ``pending`` those still uploading."""
        states = ("READY", "PENDING") if pending else ("READY",)
        return [m for m in self.sdk.logged_models(self._handle(run).experiment_id, run.run_id)
                if TAG_VERSION in m.tags and str(m.status).endswith(states)]

    def list(self, run: RunInfo) -> list[Stored]:
        with self.sdk.errors(f"listing checkpoints of MLflow run {run.run_id}"):
            return sorted((stored_from(run, m) for m in self._models(run)), key=lambda s: s.version)

    def _next_version(self, run: RunInfo, models: Sequence[Any], run_tags: Mapping[str, str]) -> int:
        """Allocate the version number; the run tag keeps the high-water mark, so a deleted
        newest version's number is never reused."""
        last = run_tags.get(TAG_LAST_VERSION, "0")
        version = next_version((int(x.tags[TAG_VERSION]) for x in models), int(last))
        self._client.set_tag(run.run_id, TAG_LAST_VERSION, str(version))
        return version

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        m = ckpt.manifest
        with self.sdk.errors(f"logging checkpoint step {m.step} to MLflow run {run.run_id}"):
            models = self._models(run)
            data = self._client.get_run(run.run_id).data
            version = self._next_version(run, models, data.tags)
            params = dict(data.params)  # the run config, shown on the model's page too
            model = self._client.create_logged_model(
                self._handle(run).experiment_id, name=f"{run.name}-step-{m.step}", source_run_id=run.run_id,
                tags={**model_tags(m, version),
                      **native.page_tags(m.step, version, (), run.run_id, self.sdk.tracking_uri)},
                params=params if len(params) <= _PARAMS_PER_CALL else None, model_type="checkpoint",
            )
            if len(params) > _PARAMS_PER_CALL:
                items = sorted(params.items())
                for i in range(0, len(items), _PARAMS_PER_CALL):
                    self._client.log_model_params(model.model_id, dict(items[i:i + _PARAMS_PER_CALL]))
            uploaded = self._complete(run, model, ckpt)
            stored = stored_from(run, self._register(run, model.model_id))
        self.set_aliases(stored, aliases, models=models)
        self.blobs.remember(model.model_id, m)
        with self.sdk.errors(f"reading back checkpoint step {m.step} of MLflow run {run.run_id}"):
            return replace(stored_from(run, self._client.get_logged_model(model.model_id)), uploaded=uploaded)

    def _complete(self, run: RunInfo, model: Any, ckpt: LocalCheckpoint) -> int:
        """Upload the files, log metrics and the run output, mark the model READY; the bytes sent.
        On any failure the model is marked FAILED: a half-uploaded model never looks like a
        checkpoint (and ``sweep`` removes it)."""
        from mlflow.entities import LoggedModelOutput, Metric

        m = ckpt.manifest
        try:
            uploaded = self._upload(run, model, ckpt)
            if m.metrics:
                ts = millis(m.created)
                self._client.log_batch(run.run_id, metrics=[
                    Metric(k, v, ts, m.step, model_id=model.model_id) for k, v in m.metrics.items()])
            self.sdk.retried(
                lambda: self._client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, step=m.step)]),
                done=lambda: self.sdk.is_output(run.run_id, model.model_id))
            self._client.finalize_logged_model(model.model_id, "READY")
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.finalize_logged_model(model.model_id, "FAILED")
            raise
        return uploaded

    def _upload(self, run: RunInfo, model: Any, ckpt: LocalCheckpoint) -> int:
        """Send the blobs the run lacks, then the model's own files, ``manifest.json`` last.
        Through the artifact repositories, not ``MlflowClient.log_model_artifacts``: other SDKs
        (comet_ml, imported by transformers) patch that method and copy the files elsewhere."""
        m = ckpt.manifest
        run_repo = self.sdk.repo(self._handle(run).artifact_uri)
        sent = files_to_send(m, self.blobs.held(run_repo))
        self.blobs.send(run_repo, ckpt.path, filter(is_blob, sent))
        repo = self.sdk.repo(model.artifact_location)
        for fname in (f for f in sent if not is_blob(f)):
            repo.log_artifact(str(ckpt.path / fname), posixpath.dirname(fname) or None)
        with tempfile.TemporaryDirectory(prefix="ckpt_track-listing-") as tmp:
            repo.log_artifact(str(native.write_listing(ckpt, Path(tmp))))
        repo.log_artifact(str(ckpt.path / MANIFEST))  # last: the commit
        return sum(m.files[f].size for f in sent) + (ckpt.path / MANIFEST).stat().st_size

    def _register(self, run: RunInfo, model_id: str) -> Any:
        """The finished model, registered as a new version of ``register_as`` when set."""
        model = self._client.get_logged_model(model_id)
        if not self.register_as:
            return model
        self._ensure_registered()
        # no await_creation_for: the SDK would log "Waiting up to 300 seconds ..." at INFO for
        # every checkpoint; a version still pending is waited for here, quietly
        mv = self._client.create_model_version(
            self.register_as, source=f"models:/{model_id}", run_id=run.run_id, model_id=model_id,
            tags=native.registry_tags(model.tags), description=model.tags.get(native.NOTE),
            await_creation_for=0,
        )
        deadline = time.monotonic() + 60
        while str(mv.status) == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(0.2)
            mv = self._client.get_model_version(self.register_as, str(mv.version))
        self._client.set_logged_model_tags(model_id, {TAG_REGISTERED: str(mv.version)})
        return self._client.get_logged_model(model_id)

    def _ensure_registered(self) -> None:
        try:
            self._client.get_registered_model(self.register_as)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            self._client.create_registered_model(
                self.register_as, description="Training checkpoints logged by ckpt_track",
            )

    def sweep(self, run: RunInfo) -> None:
        """Delete the ckpt_track models of ``run`` that a killed or failed upload left unfinished
        (PENDING or FAILED: never listed), and their artifacts.  Called once per process of the
        run before its uploads; one writer per run, so none of them is still being written."""
        with self.sdk.errors(f"cleaning up unfinished checkpoints of MLflow run {run.run_id}"):
            for model in self.sdk.logged_models(self._handle(run).experiment_id, run.run_id):
                if TAG_VERSION not in model.tags or str(model.status).endswith("READY"):
                    continue
                with contextlib.suppress(Exception):  # nothing was uploaded yet
                    self.sdk.repo(model.artifact_location).delete_artifacts()
                self._delete_model(model.model_id)

    def _delete_model(self, model_id: str) -> None:
        """Delete a LoggedModel; a retried delete that finds it gone has succeeded."""
        self.sdk.retried(lambda: self._client.delete_logged_model(model_id),
                         done=lambda: not self.sdk.exists(model_id))

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        model: MlflowModel = stored.native
        what = f"downloading checkpoint {stored.ref}"

        def own(into: Path) -> None:
            with self.sdk.errors(what):
                self.sdk.repo(model.artifact_location).download_artifacts("", dst_path=str(into))
            (into / native.LISTING).unlink(missing_ok=True)  # for the UI only: not a checkpoint file

        def blobs(names: Sequence[str], into: Path) -> None:
            # blobs the model does not hold itself are in the run (earlier versions put every file in the model)
            with self.sdk.errors(what):
                self._download_blobs(stored, names, into)

        # the cache's own file work (staging, links, swap) is outside the SDK boundary: a full
        # cache disk is an OSError, not "cannot reach MLflow"
        return cache.fetch(Path(dest), own, blobs, where=f"checkpoint {stored.ref}")

    def _download_blobs(self, stored: Stored, names: Sequence[str], dest: Path) -> None:
        run_repo = self.sdk.repo(self._handle(stored.run).artifact_uri)
        self.blobs.download(run_repo, names, dest, what=f"checkpoint {stored.ref}", run_id=stored.run.run_id)

    def set_aliases(self, stored: Stored, aliases: Sequence[str], models: list[Any] | None = None) -> None:
        if not aliases:
            return
        model_id = stored.native.model_id
        with self.sdk.errors(f"moving aliases {list(aliases)} to {stored.ref}"):
            moved_from = [other.model_id for other in (models if models is not None else self._models(stored.run))
                          if other.model_id != model_id and self._drop_aliases(other, aliases)]
            self._client.set_logged_model_tags(model_id, {TAG_ALIAS + a: "true" for a in aliases})
            for mid in [model_id, *moved_from]:  # their pages (and registry versions) name their aliases
                self._refresh_page(mid, stored.run.run_id)
            registered = stored.native.registered_version or self._client.get_logged_model(
                model_id).tags.get(TAG_REGISTERED)
            if self.register_as and registered and "best" in aliases:
                self._client.set_registered_model_alias(self.register_as, "best", str(registered))

    def _drop_aliases(self, model: Any, aliases: Sequence[str]) -> bool:
        """Take ``aliases`` off ``model``; True when it held any of them."""
        held = [t for t in (TAG_ALIAS + a for a in aliases) if t in model.tags]
        for tag in held:
            self._drop_tag(model.model_id, tag)
        return bool(held)

    def _refresh_page(self, model_id: str, run_id: str) -> None:
        """Rewrite a model's alias list and description from its alias tags, and bring its
        registry version (``register_as``) to the same tags and description."""
        tags = self._client.get_logged_model(model_id).tags
        page = native.page_tags(int(tags.get(TAG_STEP, 0)), int(tags[TAG_VERSION]), native.aliases_of(tags),
                                run_id, self.sdk.tracking_uri)
        self._client.set_logged_model_tags(model_id, page)
        version = tags.get(TAG_REGISTERED)
        if self.register_as and version:
            self._sync_version(version, {**tags, **page})

    def _sync_version(self, version: str, tags: Mapping[str, str]) -> None:
        """Registry version ``version`` of ``register_as``: the model's tags and description."""
        name = self.register_as
        mv = self._client.get_model_version(name, version)
        want = native.registry_tags(tags)
        for key in [k for k in mv.tags if k.startswith(TAG_ALIAS) and k not in want]:
            self._client.delete_model_version_tag(name, version, key)
        for key, value in want.items():
            if mv.tags.get(key) != value:
                self._client.set_model_version_tag(name, version, key, value)
        if (mv.description or "") != tags.get(native.NOTE, ""):
            self._client.update_model_version(name, version, description=tags.get(native.NOTE, ""))

    def _drop_tag(self, model_id: str, tag: str) -> None:
        """Delete a model's tag; a retried delete that finds the tag gone has succeeded."""
        self.sdk.retried(lambda: self._client.delete_logged_model_tag(model_id, tag),
                         done=lambda: tag not in self._client.get_logged_model(model_id).tags)

    def delete(self, stored: Stored) -> None:
        model: MlflowModel = stored.native
        with self.sdk.errors(f"deleting checkpoint {stored.ref}"):
            if self.register_as and model.registered_version:
                self._client.delete_model_version(self.register_as, str(model.registered_version))
            self.sdk.repo(model.artifact_location).delete_artifacts()
            self._client.delete_logged_model(model.model_id)
            self.blobs.forget(model.model_id)
            self._sweep_blobs(stored.run, deleted=model.model_id)

    def _sweep_blobs(self, run: RunInfo, deleted: str) -> None:
        """Delete the run's blobs that no remaining checkpoint (nor one still uploading) names."""
        self.blobs.sweep(self.sdk.repo(self._handle(run).artifact_uri),
                         remaining=lambda: [m for m in self._models(run, pending=True) if m.model_id != deleted])

    def link_input(self, run: RunInfo, source: Stored) -> None:
        from mlflow.entities import LoggedModelInput

        with self.sdk.errors(f"recording {source.ref} as an input of run {run.run_id}"):
            self._client.log_inputs(run.run_id, models=[LoggedModelInput(source.native.model_id)])
            self._client.set_tag(run.run_id, "ckpt_track.resumed_from", str(source.ref))

    def finish_run(self, run: RunInfo) -> None:
        # MLflow prints "View run ... at <url>" to stdout here; keep stdout clean for the
        # caller's own output (and --json), and show the link on stderr instead
        with self.sdk.errors(f"finishing MLflow run {run.run_id}"), contextlib.redirect_stdout(sys.stderr):
            self._client.set_terminated(run.run_id, "FINISHED")

    # -- references --------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return refs.parse(text)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return refs.REF_FORMS
