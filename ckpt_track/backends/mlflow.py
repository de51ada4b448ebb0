"""The ``mlflow`` backend: each checkpoint is an MLflow 3 LoggedModel of its run.

What the MLflow UI shows for a checkpoint logged here:

- a LoggedModel (``model_type="checkpoint"``) linked to the run as an output at its
  ``step``, holding ``manifest.json``, ``state.json`` and any tensor file that is not
  content-addressed as its artifacts;
- the content-addressed tensor files (``t-<digest>.safetensors``) once per run, in the run's
  artifacts under ``ckpt_track/blobs/``: a checkpoint uploads only the ones the run does not
  hold yet, and deleting a checkpoint removes only the ones no other checkpoint names;
- the checkpoint's metrics, logged on the run with ``step`` and ``model_id``;
- tags: ``step``, ``ckpt_track.version``, ``ckpt_track.alias.<alias>`` and lineage
  (``ckpt_track.parent``, ``ckpt_track.resumed_from``, git commit, config hash);
- optionally (``register_as``) a registered model version per checkpoint, with the
  registry alias ``best`` kept current (MLflow reserves ``latest``: its own
  ``models:/<name>/latest`` already means the newest checkpoint).

On resume from an MLflow checkpoint the source model is logged as an input of the new run.
The SDK is imported on first use only.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from ..errors import (
    AuthError,
    BackendError,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from ..format import MANIFEST, LocalCheckpoint, is_blob, link_cached, read_manifest, verify
from ..refs import Ref
from ..records import RunInfo, RunSpec, Stored

__all__ = ["MlflowBackend"]

TAG_VERSION = "ckpt_track.version"
TAG_LAST_VERSION = "ckpt_track.last_version"
TAG_ALIAS = "ckpt_track.alias."
TAG_STEP = "step"
_LINEAGE_TAGS = {"parent": "ckpt_track.parent", "resumed_from": "ckpt_track.resumed_from",
                 "config_hash": "ckpt_track.config_hash", "run": "ckpt_track.run"}
BLOBS = "ckpt_track/blobs"  # run artifact directory of the content-addressed tensor files
_PARAM_MAX = 6000
_RUN_ID = r"[0-9a-f]{32}"
_MODEL_ID = r"m-[0-9a-f]{32}"
_NAME = r"[A-Za-z0-9_.\-]+"
_UI = re.compile(r"^(?P<base>https?://[^#\s]+?)/?#/(?P<route>[^?\s]*)(?:\?.*)?$")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
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
    options: ClassVar[frozenset[str]] = frozenset(
        {"tracking_uri", "registry_uri", "experiment", "register_as", "artifact_location", "ui"}
    )
    capabilities: ClassVar[frozenset[str]] = frozenset({"delete", "registry", "dedup"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - self.options
        if unknown:
            raise ConfigError(f"mlflow backend: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        # a configured URI wins; a URI taken from a pasted UI URL ("ui") is the fallback
        self.tracking_uri: str | None = (options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
                                         or options.get("ui") or None)
        self.registry_uri: str | None = options.get("registry_uri") or None
        self.experiment: str | None = options.get("experiment") or None
        self.register_as: str | None = options.get("register_as") or None
        self.artifact_location: str | None = options.get("artifact_location") or None
        self._client_obj: Any = None
        self._blobs_of: dict[str, frozenset[str]] = {}  # model id -> blob files its manifest names

    def check_configured(self) -> None:
        """Before resolving a reference: a tracking URI must be known.  MLflow's own default
        (``sqlite:///<cwd>/mlflow.db``, artifacts in ``./mlruns``) would create an empty store
        in the working directory and then report the run missing from it."""
        if self.tracking_uri is None and not _uri_set_in_process():
            raise ConfigError(
                "no MLflow tracking URI is configured to look the reference up in: set MLFLOW_TRACKING_URI "
                "or [mlflow] tracking_uri (e.g. http://127.0.0.1:5000), or pass the run's MLflow UI URL"
            )

    # -- SDK boundary --------------------------------------------------------------------
    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            try:
                from mlflow import MlflowClient
            except ImportError as exc:
                from ..errors import BackendNotInstalled

                raise BackendNotInstalled("mlflow", "mlflow", "mlflow") from exc
            try:
                self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
            except CkptTrackError:
                raise
            except Exception as exc:  # an unsupported URI scheme, a malformed URI
                raise ConfigError(f"MLflow cannot use the tracking URI {self._where!r}: {exc}; fix "
                                  "MLFLOW_TRACKING_URI or [mlflow] tracking_uri") from exc
        return self._client_obj

    def _repo(self, artifact_uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri)

    def _run_repo(self, run: RunInfo) -> Any:
        uri = run.native.get("artifact_uri") or self._client.get_run(run.run_id).info.artifact_uri
        return self._repo(uri)

    @staticmethod
    def _held_blobs(run_repo: Any) -> dict[str, int | None]:
        """Blob file name -> size, of the blobs the run holds (one listing call)."""
        return {posixpath.basename(f.path): f.file_size for f in run_repo.list_artifacts(BLOBS) if not f.is_dir}

    @property
    def _where(self) -> str:
        return self.tracking_uri or "the default MLflow tracking URI"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Map MLflow and HTTP errors into the ckpt_track tree, once, at the boundary."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except CkptTrackError:
            raise
        except MlflowException as exc:
            code = getattr(exc, "error_code", "") or ""
            msg = getattr(exc, "message", str(exc))
            if code == "RESOURCE_DOES_NOT_EXIST":
                raise CheckpointNotFound(f"{what}: {msg} (tracking URI {self._where})") from exc
            # a status code, not any digits: a port such as 40329 is no 403
            if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or re.search(r"\b(?:401|403)\b(?!\.)", msg):
                raise AuthError(
                    f"{what}: MLflow at {self._where} refused the credentials ({msg}); set "
                    "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from exc
            if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"):
                raise BackendError(f"{what}: MLflow at {self._where} rejected the request: {msg}") from exc
            first = (msg.splitlines() or [""])[0][:300]
            raise BackendUnavailable(
                f"{what}: MLflow at {self._where} is unreachable or failing ({first}); {self._hint}"
            ) from exc
        except (OSError, ConnectionError) as exc:
            raise BackendUnavailable(f"{what}: cannot reach MLflow at {self._where}: {exc}; {self._hint}") from exc
        except Exception as exc:  # requests' exceptions and anything else the SDK lets through
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise BackendUnavailable(
                    f"{what}: cannot reach MLflow at {self._where}: {exc}; {self._hint}") from exc
            raise

    @property
    def _hint(self) -> str:
        from ..network import unavailable_hint

        return unavailable_hint("MLFLOW_TRACKING_URI / [mlflow] tracking_uri")

    # -- runs -----------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self._client.create_experiment(name, artifact_location=self.artifact_location))
        except Exception:  # another process created it first
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _info(self, run: Any, resumed: bool) -> RunInfo:
        exp = self._client.get_experiment(run.info.experiment_id)
        return RunInfo(
            backend=self.name, project=exp.name, run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id, ref=Ref(self.name, run.info.run_id),
            resumed=resumed,
            native={"experiment_id": str(run.info.experiment_id), "artifact_uri": run.info.artifact_uri},
        )

    def open_run(self, spec: RunSpec) -> RunInfo:
        with self._errors(f"opening a run in experiment {self.experiment or spec.project!r}"):
            exp_id = self._experiment_id(self.experiment or spec.project)
            existing = None
            if spec.run_id is not None:
                try:
                    existing = self._client.get_run(spec.run_id)
                except Exception as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                        raise
            elif spec.name is not None and spec.resume != "never":
                found = self._client.search_runs(
                    [exp_id], filter_string=f"tags.mlflow.runName = '{spec.name}'",
                    order_by=["attributes.start_time DESC"], max_results=1,
                )
                existing = found[0] if found else None
            if existing is not None:
                if spec.resume == "never":
                    raise ConfigError(
                        f"MLflow run {existing.info.run_id} already exists and resume='never'; "
                        "pass resume='auto' to continue it, or another run_id"
                    )
                self._client.update_run(existing.info.run_id, status="RUNNING")
                return self._info(existing, resumed=True)
            if spec.resume == "must":
                raise CheckpointNotFound(
                    f"no MLflow run {spec.run_id or spec.name!r} in experiment {self.experiment or spec.project!r} "
                    f"at {self._where}"
                )
            if spec.run_id is not None:
                raise ConfigError(
                    f"MLflow assigns run ids itself; run {spec.run_id!r} does not exist at {self._where}. "
                    "Use name= to find a run again, or resume='never' without run_id"
                )
            run = self._client.create_run(exp_id, run_name=spec.name, tags={"ckpt_track": "true"})
            params = _flatten(spec.config)
            if params:
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), 100):  # the REST API takes at most 100 params a call
                    self._client.log_batch(run.info.run_id, params=items[i:i + 100])
            return self._info(run, resumed=False)

    def find_run(self, ref: Ref) -> RunInfo:
        if len(ref.segments) != 1:
            raise InvalidRef(f"{ref}: an MLflow run reference is mlflow://<run_id>")
        with self._errors(f"looking up MLflow run {ref.path}"):
            return self._info(self._client.get_run(ref.path), resumed=True)

    def resolve_ref(self, ref: Ref) -> Ref:
        """``models/<id>`` and ``registered/<name>`` references → ``<run_id>:vN``."""
        segs = ref.segments
        if len(segs) == 2 and segs[0] == "models":
            with self._errors(f"looking up logged model {segs[1]}"):
                return self._model_ref(self._client.get_logged_model(segs[1]), ref)
        if len(segs) == 2 and segs[0] == "registered":
            name = segs[1]
            with self._errors(f"looking up registered model {name!r}"):
                if ref.version is not None:
                    mv = self._client.get_model_version(name, str(ref.version))
                elif ref.alias in (None, "latest"):
                    versions = self._client.search_model_versions(f"name='{name}'")
                    if not versions:
                        raise CheckpointNotFound(f"registered model {name!r} has no versions at {self._where}")
                    mv = max(versions, key=lambda v: int(v.version))
                else:
                    mv = self._client.get_model_version_by_alias(name, ref.alias)
                model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
                return self._model_ref(self._client.get_logged_model(model_id), ref)
        return ref

    def _model_ref(self, model: Any, ref: Ref) -> Ref:
        version = model.tags.get(TAG_VERSION)
        if version is None or not model.source_run_id:
            raise CheckpointNotFound(f"logged model {model.model_id} was not logged by ckpt_track (no {TAG_VERSION} tag)")
        return Ref(self.name, model.source_run_id, version=int(version), params=ref.params)

    # -- checkpoints -------------------------------------------------------------------------
    def _models(self, run: RunInfo, pending: bool = False) -> list[Any]:
        """The run's ckpt_track models: READY ones, and with ``pending`` those still uploading."""
        states = ("READY", "PENDING") if pending else ("READY",)
        models: list[Any] = []
        token = None
        while True:
            page = self._client.search_logged_models(
                [run.native["experiment_id"]],
                filter_string=f"source_run_id='{run.run_id}'", max_results=100, page_token=token,
            )
            models.extend(m for m in page if TAG_VERSION in m.tags and str(m.status).endswith(states))
            token = page.token
            if not token:
                return models

    def _stored(self, run: RunInfo, model: Any) -> Stored:
        tags = model.tags
        version = int(tags[TAG_VERSION])
        lineage = {k: tags.get(t) for k, t in _LINEAGE_TAGS.items()}  # None: recorded as absent
        return Stored(
            ref=run.ref.select(version=version), run=run, version=version, step=int(tags.get(TAG_STEP, 0)),
            epoch=int(tags["ckpt_track.epoch"]) if tags.get("ckpt_track.epoch", "") not in ("", "None") else None,
            aliases=tuple(sorted(k[len(TAG_ALIAS):] for k in tags if k.startswith(TAG_ALIAS))),
            metrics={m.key: float(m.value) for m in (model.metrics or [])},
            size=int(tags.get("ckpt_track.size", 0)), created=tags.get("ckpt_track.created", ""),
            lineage=lineage,
            native={"model_id": model.model_id, "artifact_location": model.artifact_location,
                    "registered_version": tags.get("ckpt_track.registered_version")},
        )

    def list(self, run: RunInfo) -> list[Stored]:
        with self._errors(f"listing checkpoints of MLflow run {run.run_id}"):
            return sorted((self._stored(run, m) for m in self._models(run)), key=lambda s: s.version)

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        from mlflow.entities import LoggedModelOutput, Metric

        m = ckpt.manifest
        with self._errors(f"logging checkpoint step {m.step} to MLflow run {run.run_id}"):
            models = self._models(run)
            # the run tag is a high-water mark: a deleted newest version's number is never reused
            last = self._client.get_run(run.run_id).data.tags.get(TAG_LAST_VERSION, "0")
            version = max([*(int(x.tags[TAG_VERSION]) for x in models), int(last)], default=0) + 1
            self._client.set_tag(run.run_id, TAG_LAST_VERSION, str(version))
            git = m.lineage.get("git") or {}
            tags = {
                TAG_VERSION: str(version), TAG_STEP: str(m.step), "ckpt_track.epoch": str(m.epoch),
                "ckpt_track.size": str(m.size), "ckpt_track.created": m.created,
                "ckpt_track.format_version": str(m.format_version),
                **{t: str(m.lineage[k]) for k, t in _LINEAGE_TAGS.items() if m.lineage.get(k)},
                **({"ckpt_track.git_commit": str(git.get("commit")), "ckpt_track.git_dirty": str(git.get("dirty"))}
                   if git else {}),
            }
            model = self._client.create_logged_model(
                run.native["experiment_id"], name=f"{run.name}-step-{m.step}", source_run_id=run.run_id,
                tags=tags, model_type="checkpoint",
            )
            try:
                # through the artifact repositories, not MlflowClient.log_model_artifacts: other SDKs
                # (comet_ml, imported by transformers) patch that method and copy the files elsewhere
                run_repo = self._run_repo(run)
                held = self._held_blobs(run_repo)
                sent = [f for f, e in m.files.items() if not is_blob(f) or held.get(f) != e.size]
                for fname in filter(is_blob, sent):  # blobs first: a manifest never names a file not there
                    run_repo.log_artifact(str(ckpt.path / fname), BLOBS)
                repo = self._repo(model.artifact_location)
                for fname in [*(f for f in sent if not is_blob(f)), MANIFEST]:
                    repo.log_artifact(str(ckpt.path / fname), posixpath.dirname(fname) or None)
                uploaded = sum(m.files[f].size for f in sent) + (ckpt.path / MANIFEST).stat().st_size
                if m.metrics:
                    ts = _millis(m.created)
                    self._client.log_batch(run.run_id, metrics=[
                        Metric(k, v, ts, m.step, model_id=model.model_id) for k, v in m.metrics.items()
                    ])
                self._retried(lambda: self._client.log_outputs(
                    run.run_id, [LoggedModelOutput(model.model_id, step=m.step)]),
                    done=lambda: self._is_output(run.run_id, model.model_id))
                self._client.finalize_logged_model(model.model_id, "READY")
            except BaseException:
                try:  # never leave a half-uploaded model looking like a checkpoint
                    self._client.finalize_logged_model(model.model_id, "FAILED")
                except Exception:
                    pass
                raise
            model = self._client.get_logged_model(model.model_id)
            if self.register_as:
                self._ensure_registered()
                mv = self._client.create_model_version(
                    self.register_as, source=f"models:/{model.model_id}", run_id=run.run_id, model_id=model.model_id,
                )
                self._client.set_logged_model_tags(model.model_id, {"ckpt_track.registered_version": str(mv.version)})
                model = self._client.get_logged_model(model.model_id)
            stored = self._stored(run, model)
        self.set_aliases(stored, aliases, models=models)
        self._blobs_of[model.model_id] = frozenset(f for f in m.files if is_blob(f))
        with self._errors(f"reading back checkpoint step {m.step} of MLflow run {run.run_id}"):
            return replace(self._stored(run, self._client.get_logged_model(model.model_id)), uploaded=uploaded)

    @staticmethod
    def _retried(call: Any, done: Any) -> None:
        """``call()``, where a request the server carried out but whose answer was lost comes
        back from the SDK's own retry as a refusal (a UNIQUE constraint): ``done()`` tells."""
        try:
            call()
        except Exception:
            try:
                if done():
                    return
            except Exception:
                pass
            raise

    def _exists(self, model_id: str) -> bool:
        try:
            return not str(self._client.get_logged_model(model_id).status).endswith("DELETED")
        except Exception as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _is_output(self, run_id: str, model_id: str) -> bool:
        outputs = getattr(self._client.get_run(run_id), "outputs", None)
        return any(o.model_id == model_id for o in (getattr(outputs, "model_outputs", None) or []))

    def sweep(self, run: RunInfo) -> None:
        """Delete the ckpt_track models of ``run`` that a killed or failed upload left unfinished
        (PENDING or FAILED: never listed), and their artifacts.  Called once per process of the
        run before its uploads; one writer per run, so none of them is still being written."""
        with self._errors(f"cleaning up unfinished checkpoints of MLflow run {run.run_id}"):
            token = None
            while True:
                page = self._client.search_logged_models(
                    [run.native["experiment_id"]],
                    filter_string=f"source_run_id='{run.run_id}'", max_results=100, page_token=token,
                )
                for model in page:
                    if TAG_VERSION in model.tags and not str(model.status).endswith("READY"):
                        try:
                            self._repo(model.artifact_location).delete_artifacts()
                        except Exception:
                            pass  # nothing was uploaded yet
                        self._retried(lambda: self._client.delete_logged_model(model.model_id),
                                      done=lambda: not self._exists(model.model_id))
                token = page.token
                if not token:
                    return

    def _ensure_registered(self) -> None:
        try:
            self._client.get_registered_model(self.register_as)
        except Exception as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._client.create_registered_model(
                self.register_as, description="Training checkpoints logged by ckpt_track",
            )

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        dest = Path(dest)
        if (dest / MANIFEST).is_file():
            try:
                return LocalCheckpoint(dest, verify(dest))  # cached and intact: no download
            except IntegrityError:
                pass
        tmp = dest.with_name(f".{dest.name}.download")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self._errors(f"downloading checkpoint {stored.ref}"):
            self._repo(stored.native["artifact_location"]).download_artifacts("", dst_path=str(tmp))
            # blobs the model does not hold itself are in the run (earlier versions put every file in the model)
            manifest = read_manifest(tmp)
            wanted = [f for f in manifest.files if is_blob(f) and not (tmp / f).is_file()]
            # files an earlier download of this run already holds are linked, not downloaded again
            wanted = link_cached(tmp, manifest, wanted, dest)
            if wanted:
                self._download_blobs(stored, wanted, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return LocalCheckpoint(dest, read_manifest(dest))

    def _download_blobs(self, stored: Stored, names: Sequence[str], dest: Path) -> None:
        run_repo = self._run_repo(stored.run)
        gone = sorted(set(names) - set(self._held_blobs(run_repo)))
        if gone:
            raise IntegrityError(
                f"checkpoint {stored.ref}: tensor file(s) {', '.join(gone)} are missing from "
                f"{BLOBS}/ in the artifacts of MLflow run {stored.run.run_id}"
            )
        stage = dest / ".ckpt_track-blobs"
        stage.mkdir()

        def fetch(fname: str) -> None:
            run_repo.download_artifacts(f"{BLOBS}/{fname}", dst_path=str(stage))
            os.replace(stage / BLOBS / fname, dest / fname)

        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            list(pool.map(fetch, names))
        shutil.rmtree(stage)

    def set_aliases(self, stored: Stored, aliases: Sequence[str], models: list[Any] | None = None) -> None:
        if not aliases:
            return
        model_id = stored.native["model_id"]
        with self._errors(f"moving aliases {list(aliases)} to {stored.ref}"):
            for other in models if models is not None else self._models(stored.run):
                if other.model_id == model_id:
                    continue
                for alias in aliases:
                    if TAG_ALIAS + alias in other.tags:
                        self._retried(  # a retried delete finds the tag gone: that is success
                            lambda: self._client.delete_logged_model_tag(other.model_id, TAG_ALIAS + alias),
                            done=lambda: TAG_ALIAS + alias not in self._client.get_logged_model(other.model_id).tags)
            self._client.set_logged_model_tags(model_id, {TAG_ALIAS + a: "true" for a in aliases})
            registered = stored.native.get("registered_version") or self._client.get_logged_model(
                model_id).tags.get("ckpt_track.registered_version")
            if self.register_as and registered and "best" in aliases:
                self._client.set_registered_model_alias(self.register_as, "best", str(registered))

    def delete(self, stored: Stored) -> None:
        with self._errors(f"deleting checkpoint {stored.ref}"):
            registered = stored.native.get("registered_version")
            if self.register_as and registered:
                self._client.delete_model_version(self.register_as, str(registered))
            self._repo(stored.native["artifact_location"]).delete_artifacts()
            self._client.delete_logged_model(stored.native["model_id"])
            self._blobs_of.pop(stored.native["model_id"], None)
            self._sweep_blobs(stored.run, deleted=stored.native["model_id"])

    def _sweep_blobs(self, run: RunInfo, deleted: str) -> None:
        """Delete the run's blobs that no remaining checkpoint (nor one still uploading) names."""
        run_repo = self._run_repo(run)
        held = self._held_blobs(run_repo)
        if not held:
            return
        needed: set[str] = set()
        for model in self._models(run, pending=True):
            if model.model_id != deleted:
                needed |= self._blobs_named(model)
        for fname in sorted(held.keys() - needed):
            run_repo.delete_artifacts(f"{BLOBS}/{fname}")

    def _blobs_named(self, model: Any) -> frozenset[str]:
        """The blob files a model's manifest names (cached: a model's manifest never changes)."""
        if model.model_id not in self._blobs_of:
            with tempfile.TemporaryDirectory(prefix="ckpt_track-manifest-") as tmp:
                try:
                    self._repo(model.artifact_location).download_artifacts(MANIFEST, dst_path=tmp)
                except Exception:
                    if str(model.status).endswith("READY"):
                        raise
                    return frozenset()  # still uploading, its manifest not there yet: it names nothing
                files = read_manifest(Path(tmp)).files
            self._blobs_of[model.model_id] = frozenset(f for f in files if is_blob(f))
        return self._blobs_of[model.model_id]

    def link_input(self, run: RunInfo, source: Stored) -> None:
        from mlflow.entities import LoggedModelInput

        with self._errors(f"recording {source.ref} as an input of run {run.run_id}"):
            self._client.log_inputs(run.run_id, models=[LoggedModelInput(source.native["model_id"])])
            self._client.set_tag(run.run_id, "ckpt_track.resumed_from", str(source.ref))

    def finish_run(self, run: RunInfo) -> None:
        # MLflow prints "View run ... at <url>" to stdout here; keep stdout clean for the
        # caller's own output (and --json), and show the link on stderr instead
        with self._errors(f"finishing MLflow run {run.run_id}"), contextlib.redirect_stdout(sys.stderr):
            self._client.set_terminated(run.run_id, "FINISHED")

    # -- references --------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        text = text.strip()
        if m := _UI.match(text):
            urlsplit(m.group("base")).port  # ValueError for a bad port or host: InvalidRef at refs.parse_ref
            params = (("ui", m.group("base").rstrip("/")),)
            route = [unquote(p) for p in m.group("route").strip("/").split("/")]
            if len(route) >= 4 and route[0] == "experiments" and route[2] == "runs" and re.fullmatch(_RUN_ID, route[3]):
                return Ref(cls.name, route[3], params=params)
            if len(route) >= 4 and route[0] == "experiments" and route[2] == "models" and re.fullmatch(_MODEL_ID, route[3]):
                return Ref(cls.name, f"models/{route[3]}", params=params)
            if len(route) >= 4 and route[0] == "models" and route[2] == "versions" and route[3].isdigit():
                return _registered(route[1], version=int(route[3]), params=params)
            return None
        if m := re.fullmatch(rf"runs:/({_RUN_ID})(?:/({_NAME}))?/?", text):
            sel = m.group(2)
            if sel is None:
                return Ref(cls.name, m.group(1))
            if re.fullmatch(r"v\d+", sel):
                return Ref(cls.name, m.group(1), version=int(sel[1:]))
            return Ref(cls.name, m.group(1), alias=sel)
        if m := re.fullmatch(rf"models:/({_MODEL_ID})/?", text):
            return Ref(cls.name, f"models/{m.group(1)}")
        if m := re.fullmatch(r"models:/([^/@]+)/(\d+|latest)/?", text):
            v = m.group(2)
            return _registered(m.group(1), version=None if v == "latest" else int(v), alias="latest" if v == "latest" else None)
        if m := re.fullmatch(rf"models:/([^/@]+)@({_NAME})", text):
            return _registered(m.group(1), alias=m.group(2))
        return None

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return (
            "mlflow://<run_id>[@selector]   runs:/<run_id>[/<alias>]",
            "models:/m-<model_id>   models:/<name>/<version>   models:/<name>@<alias>",
            "MLflow UI URLs: http://host/#/experiments/<id>/runs/<run_id>, .../models/m-<id>, "
            "http://host/#/models/<name>/versions/<v>",
        )


def _uri_set_in_process() -> bool:
    """``mlflow.set_tracking_uri(...)`` was called in this process (checked without importing mlflow)."""
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    return bool(getattr(utils, "_tracking_uri", None))


def _registered(name: str, *, version: int | None = None, alias: str | None = None,
                params: tuple[tuple[str, str], ...] = ()) -> Ref:
    if not re.fullmatch(_NAME, name):
        raise InvalidRef(f"registered model name {name!r}: ckpt_track references support letters, digits, '_', '.', '-'")
    return Ref("mlflow", f"registered/{name}", version=version, alias=alias, params=params)


def _millis(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except ValueError:
        import time

        return int(time.time() * 1000)
