"""comet_ml's own settings as the defaults of the ``[comet]`` section.

A user who already runs Comet has it configured the Comet way: ``COMET_START_ONLINE`` /
``COMET_OFFLINE`` (``comet.start.online`` / ``comet.offline``), ``COMET_WORKSPACE``,
``COMET_PROJECT_NAME``, ``COMET_OFFLINE_DIRECTORY``, ``COMET_URL_OVERRIDE``,
``COMET_API_KEY``, or the same keys in ``.comet.config`` / ``$COMET_CONFIG``.  The backend reads
them through the SDK's own ``comet_ml.config.get_config()`` (so the files count as they do for
``comet_ml.start``), and ckpt_track's settings win where both are given:

=====================  =========================================  ==============================
``[comet]`` key         Comet's setting (environment / config)       when neither is set
=====================  =========================================  ==============================
``online``              ``COMET_START_ONLINE``, else not            online
                        ``COMET_OFFLINE``
``workspace``           ``COMET_WORKSPACE``                         the API key's default
``project``             ``COMET_PROJECT_NAME`` (over the default    ``ct.init(project=)``
                        project only, see :func:`project_for`)
``offline_directory``   ``COMET_OFFLINE_DIRECTORY``                 ``./.cometml-runs``
``url``                 ``COMET_URL_OVERRIDE`` (read by the SDK)    comet.com
=====================  =========================================  ==============================

The API key is never a ckpt_track setting: the SDK reads ``COMET_API_KEY`` or its config file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...options import project_for

__all__ = ["SdkDefaults", "project_for", "read_defaults"]

@dataclass(frozen=True)
class SdkDefaults:
    """What comet_ml's configuration says, each None when it says nothing."""

    online: bool | None = None
    workspace: str | None = None
    project: str | None = None
    offline_directory: str | None = None


def _setting(config: Any, kind: str, key: str) -> Any:
    getter = config.get_bool if kind == "bool" else config.get_string
    value = getter(None, key, default=None, not_set_value=None)
    return None if value in (None, "") else value


def read_defaults(comet_ml: Any | None) -> SdkDefaults:
    """comet_ml's settings from its environment variables and config files (nothing when the
    SDK is not installed: the backend then fails with ``BackendNotInstalled`` on first use)."""
    if comet_ml is None:
        return SdkDefaults()
    config = comet_ml.config.get_config()
    online = _setting(config, "bool", "comet.start.online")  # what comet_ml.start reads
    if online is None and config.get_config_origin("comet.offline") is not None:
        online = not bool(_setting(config, "bool", "comet.offline"))
    return SdkDefaults(online=None if online is None else bool(online),
                       workspace=_setting(config, "str", "comet.workspace"),
                       project=_setting(config, "str", "comet.project_name"),
                       offline_directory=_setting(config, "str", "comet.offline_directory"))
