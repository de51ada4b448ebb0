"""The boundary of the MLflow SDK: the client, made on first use, the artifact repositories,
and the one table that turns MLflow's errors into ckpt_track's.

Everything the backend asks MLflow goes through :class:`MlflowSdk`, inside
:meth:`MlflowSdk.errors`, so an ``MlflowException``, a ``requests`` error or an unreachable
server surfaces as one of :mod:`ckpt_track.errors` with the tracking URI and a fix in its
message.  The SDK is imported on first use only (``ckpt_track`` imports without it).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ...boundary import sdk_errors
from ...errors import (
    AuthError,
    BackendError,
    BackendNotInstalled,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
)
from . import _compat

__all__ = ["NOT_FOUND", "MlflowSdk", "is_not_found", "quiet_progress", "uri_set_in_process"]

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_AUTH_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
_REJECTED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"})
# an HTTP status in the message, not any digits: a port such as 40329 is no 403
_AUTH_STATUS = re.compile(r"\b(?:401|403)\b(?!\.)")
_CREDENTIALS = "set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def quiet_progress() -> None:
    """No SDK progress bars (``Downloading artifacts: ...``) in a process that uses the MLflow
    backend: ckpt_track reports progress itself (:mod:`ckpt_track.progress`).  Set once, from
    the thread that opens the backend, with ``setdefault`` semantics like
    :func:`ckpt_track.network.configure`: a value the user set wins.  Not toggled per call: the
    environment changing under another thread that iterates it (``requests`` does, per request)
    raises there."""
    os.environ.setdefault(_PROGRESS_ENV, "false")


def is_not_found(exc: BaseException) -> bool:
    """The SDK reported that the object asked for does not exist."""
    return getattr(exc, "error_code", "") == NOT_FOUND


def uri_set_in_process() -> bool:
    """``mlflow.set_tracking_uri(...)`` was called in this process.  Checked without importing
    mlflow: a process that never imported it cannot have called it."""
    mlflow = sys.modules.get("mlflow")
    is_set = getattr(mlflow, "is_tracking_uri_set", None)
    return bool(is_set is not None and is_set())


class MlflowSdk:
    """The MLflow client of one backend, its artifact repositories and its error table."""

    def __init__(self, tracking_uri: str | None, registry_uri: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self._client_obj: Any = None

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, made on first use (importing mlflow takes seconds)."""
        if self._client_obj is None:
            try:
                from mlflow import MlflowClient
            except ImportError as exc:
                raise BackendNotInstalled("mlflow", "mlflow", "mlflow") from exc
            try:
                self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
            except CkptTrackError:
                raise
            except Exception as exc:  # an unsupported URI scheme, a malformed URI
                raise ConfigError(f"MLflow cannot use the tracking URI {self.where!r}: {exc}; fix "
                                  "MLFLOW_TRACKING_URI or [mlflow] tracking_uri") from exc
        return self._client_obj

    def repo(self, artifact_uri: str) -> Any:
        """The artifact repository of a run's artifact root or a LoggedModel's location."""
        return _compat.artifact_repository(artifact_uri, self.tracking_uri)

    @property
    def where(self) -> str:
        """The tracking URI for messages: the one in use, never a phrase that names no setting."""
        if self.tracking_uri:
            return self.tracking_uri
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and uri_set_in_process():
            return f"{mlflow.get_tracking_uri()} (set by mlflow.set_tracking_uri)"
        return "MLflow's default tracking URI (set MLFLOW_TRACKING_URI or [mlflow] tracking_uri)"

    @property
    def hint(self) -> str:
        from ...network import unavailable_hint

        return unavailable_hint("MLFLOW_TRACKING_URI / [mlflow] tracking_uri")

    # -- the error table ---------------------------------------------------------------------
    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Map MLflow and HTTP errors into the ckpt_track tree, once, at the boundary."""
        with sdk_errors(self.translate, what):
            yield

    def translate(self, exc: Exception, what: str) -> CkptTrackError:
        """The ckpt_track error for an exception the SDK (or the network under it) raised."""
        if _is_mlflow_exception(exc):
            return self._refused(exc, what)
        if isinstance(exc, OSError) or type(exc).__module__.startswith(("requests", "urllib3")):
            return BackendUnavailable(f"{what}: cannot reach MLflow at {self.where}: {exc}; {self.hint}")
        return BackendError(f"{what}: MLflow at {self.where} failed: {type(exc).__name__}: {exc}")

    def _refused(self, exc: Exception, what: str) -> CkptTrackError:
        """An ``MlflowException``: by its error code, else by the HTTP status in its message."""
        code = getattr(exc, "error_code", "") or ""
        msg = str(getattr(exc, "message", exc))
        if code == NOT_FOUND:
            return CheckpointNotFound(f"{what}: {msg} (tracking URI {self.where})")
        if code in _AUTH_CODES or _AUTH_STATUS.search(msg):
            return AuthError(f"{what}: MLflow at {self.where} refused the credentials ({msg}); {_CREDENTIALS}")
        if code in _REJECTED_CODES:
            return BackendError(f"{what}: MLflow at {self.where} rejected the request: {msg}")
        first = (msg.splitlines() or [""])[0][:300]
        return BackendUnavailable(f"{what}: MLflow at {self.where} is unreachable or failing ({first}); {self.hint}")

    # -- calls whose answer may be lost ------------------------------------------------------
    @staticmethod
    def retried(call: Callable[[], Any], done: Callable[[], bool]) -> None:
        """``call()``, where a request the server carried out but whose answer was lost comes
        back from the SDK's own retry as a refusal (a UNIQUE constraint): ``done()`` tells."""
        try:
            call()
        except Exception:
            with contextlib.suppress(Exception):  # cannot tell: the original error stands
                if done():
                    return
            raise

    def exists(self, model_id: str) -> bool:
        """The LoggedModel is there and not deleted."""
        try:
            return not str(self.client.get_logged_model(model_id).status).endswith("DELETED")
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise

    def is_output(self, run_id: str, model_id: str) -> bool:
        """The LoggedModel is already logged as an output of the run."""
        outputs = getattr(self.client.get_run(run_id), "outputs", None)
        return any(o.model_id == model_id for o in (getattr(outputs, "model_outputs", None) or []))

    def logged_models(self, experiment_id: str, run_id: str) -> Iterator[Any]:
        """Every LoggedModel whose source is the run, page by page (any status)."""
        token = None
        while True:
            page = self.client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id='{run_id}'", max_results=100, page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                return


def _is_mlflow_exception(exc: Exception) -> bool:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(exc, MlflowException)
