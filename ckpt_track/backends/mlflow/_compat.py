"""The one MLflow SDK name ckpt_track uses that is not part of MLflow's documented API.

``get_artifact_repository`` (``mlflow.store.artifact.artifact_repository_registry``) gives the
artifact repository of a URI: a run's artifact root or a LoggedModel's artifact location.
ckpt_track goes through it instead of ``MlflowClient.log_artifact`` / ``log_model_artifacts``
because

- other SDKs patch those client methods (comet_ml, imported by transformers when installed,
  copies every file logged through ``log_model_artifacts`` into a Comet experiment), and
- the client has no way to delete one artifact file, which ``delete`` needs to remove a
  tensor file no remaining checkpoint names.

``tests/backends/test_backend_mlflow.py::test_compat_shim_matches_the_installed_sdk`` fails loudly when
an MLflow release moves the function or changes what ckpt_track calls on a repository.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPOSITORY_CALLS", "artifact_repository"]

# what ckpt_track calls on a repository: method -> the parameters it passes
REPOSITORY_CALLS: dict[str, tuple[str, ...]] = {
    "list_artifacts": ("path",),
    "log_artifact": ("local_file", "artifact_path"),
    "download_artifacts": ("artifact_path", "dst_path"),
    "delete_artifacts": ("artifact_path",),
}


def artifact_repository(artifact_uri: str, tracking_uri: str | None) -> Any:
    """The SDK's artifact repository for ``artifact_uri`` (an ``mlflow-artifacts:``, file, S3,
    ... URI), talking to the server at ``tracking_uri`` where the URI is a proxied one."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
