"""Where the MLflow backend's settings come from: ckpt_track's own (``[mlflow]``, keyword
arguments, ``CKPT_TRACK_MLFLOW__*``) first, then the MLflow SDK's documented environment
variables as defaults, then the address of a pasted UI URL.

=====================  ===========================  =====================================
what                   ckpt_track setting (wins)    MLflow's own default
=====================  ===========================  =====================================
tracking server        ``tracking_uri``             ``MLFLOW_TRACKING_URI``, else a
                                                    pasted UI URL's address (``ui``)
model registry         ``registry_uri``             ``MLFLOW_REGISTRY_URI``, else the
                                                    tracking URI
experiment             ``experiment``, else the     ``MLFLOW_EXPERIMENT_NAME``, else
                       project (unless left at      ``MLFLOW_EXPERIMENT_ID``
                       ``"default"``)
credentials            (none: passed through)       ``MLFLOW_TRACKING_TOKEN``,
                                                    ``MLFLOW_TRACKING_USERNAME`` /
                                                    ``MLFLOW_TRACKING_PASSWORD``
=====================  ===========================  =====================================

A UI URL on a Databricks workspace (``https://<ws>.cloud.databricks.com/ml/...``) maps to
the tracking URI ``databricks``, with ``DATABRICKS_HOST`` set to the workspace when unset;
the SDK then authenticates with ``DATABRICKS_TOKEN`` or ``~/.databrickscfg``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ...errors import ConfigError
from ...options import DEFAULT_PROJECT
from .refs import is_databricks_host

__all__ = ["DEFAULT_PROJECT", "databricks_credentials_problem", "experiment_name", "registry_uri", "tracking_uri"]


def tracking_uri(configured: str | None, ui: str | None) -> str | None:
    """The tracking URI: ckpt_track's setting, ``MLFLOW_TRACKING_URI``, then the pasted UI's
    address (``databricks`` for a Databricks workspace); None when nothing names one."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is not None or not ui:
        return uri
    if is_databricks_host(ui):
        # the SDK's Databricks client reads the workspace from DATABRICKS_HOST or a profile; a set
        # DATABRICKS_HOST makes it skip ~/.databrickscfg, so it is set only when no profile exists
        if not _databricks_profile():
            os.environ.setdefault("DATABRICKS_HOST", ui.rstrip("/"))
        return "databricks"
    return ui


def registry_uri(configured: str | None) -> str | None:
    """The registry URI: ckpt_track's setting, then ``MLFLOW_REGISTRY_URI`` (None: the SDK
    uses the tracking URI)."""
    return configured or os.environ.get("MLFLOW_REGISTRY_URI") or None


def experiment_name(configured: str | None, project: str, by_id: Callable[[str], str]) -> str:
    """The experiment a run goes to: ``[mlflow] experiment``, the project when one was given,
    ``MLFLOW_EXPERIMENT_NAME``, the experiment ``MLFLOW_EXPERIMENT_ID`` names (``by_id``
    looks its name up), else the project (``"default"``)."""
    if configured:
        return configured
    if project != DEFAULT_PROJECT:
        return project
    if name := os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return name
    if exp_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return by_id(exp_id)
    return project


def _databricks_config_file() -> Path:
    return Path(os.environ.get("DATABRICKS_CONFIG_FILE") or Path.home() / ".databrickscfg")


def _databricks_profile() -> bool:
    """A Databricks profile the SDK reads the workspace and credentials from (a config file or
    ``DATABRICKS_CONFIG_PROFILE``)."""
    return bool(os.environ.get("DATABRICKS_CONFIG_PROFILE")) or _databricks_config_file().is_file()


def databricks_credentials_problem(uri: str | None) -> ConfigError | None:
    """For the tracking URI ``databricks`` (or ``databricks://<profile>``): the error to raise
    when no credentials are there for the SDK to find, else None.  Checked without a network
    call: a token or OAuth client in the environment, or a config file."""
    if not uri or not uri.startswith("databricks"):
        return None
    env = os.environ
    if env.get("DATABRICKS_TOKEN") or (env.get("DATABRICKS_CLIENT_ID") and env.get("DATABRICKS_CLIENT_SECRET")):
        return None
    if env.get("DATABRICKS_USERNAME") and env.get("DATABRICKS_PASSWORD"):
        return None
    if any(env.get(v) for v in ("DATABRICKS_RUNTIME_VERSION", "DATABRICKS_AUTH_TYPE")):  # a notebook/job, or
        return None  # azure-cli / OIDC / MSI auth: the SDK finds the credentials itself
    cfg = _databricks_config_file()
    if _databricks_profile():
        return None
    host = env.get("DATABRICKS_HOST", "the workspace")
    return ConfigError(
        f"MLflow on Databricks ({host}) needs credentials: set DATABRICKS_TOKEN (a personal access token) "
        f"or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET, or create {cfg} (`databricks auth login`)"
    )
