"""W&B's own settings as the defaults of the ``[wandb]`` section.

The SDK resolves them itself, in its own order: the settings files (``~/.config/wandb/settings``
or ``$WANDB_CONFIG_DIR/settings``, then ``$WANDB_DIR/wandb/settings``, which ``wandb offline`` writes,
default ``./wandb/settings``),
then the environment (``WANDB_MODE``, ``WANDB_ENTITY``, ``WANDB_PROJECT``, ``WANDB_DIR``,
``WANDB_BASE_URL``).  ckpt_track's settings win where both are given:

=================  ===============================  ====================================
``[wandb]`` key     W&B's setting                    when neither is set
=================  ===============================  ====================================
``mode``            ``WANDB_MODE`` / ``mode =``      online
``entity``          ``WANDB_ENTITY`` / ``entity =``  the API key's default entity
``project``         ``WANDB_PROJECT`` (over the      ``ct.init(project=)``
                    default project only)
``dir``             ``WANDB_DIR``                    the working directory
``base_url``        ``WANDB_BASE_URL`` / files       the W&B cloud (read by the SDK)
=================  ===============================  ====================================

The API key is never a ckpt_track setting: the SDK reads ``WANDB_API_KEY`` or ``~/.netrc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...options import project_for

__all__ = ["SdkDefaults", "project_for", "read_defaults"]

@dataclass(frozen=True)
class SdkDefaults:
    """What W&B's settings say, each None when they say nothing."""

    mode: str | None = None
    entity: str | None = None
    project: str | None = None
    dir: str | None = None
    base_url: str | None = None


def _from_env() -> SdkDefaults:
    env = os.environ
    return SdkDefaults(env.get("WANDB_MODE") or None, env.get("WANDB_ENTITY") or None,
                       env.get("WANDB_PROJECT") or None, env.get("WANDB_DIR") or None,
                       env.get("WANDB_BASE_URL") or None)


def read_defaults() -> SdkDefaults:
    """W&B's settings files and environment as the SDK reads them (the environment alone when
    the SDK is not installed, or when it refuses a value: the backend then names the bad one)."""
    try:
        import wandb
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
    except ImportError:
        return _from_env()
    try:
        s = wandb.Settings()
        if os.environ.get("WANDB_DIR"):  # where `wandb offline` writes wandb/settings
            s.root_dir = os.environ["WANDB_DIR"]
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        s.settings_system = str(Path(config_dir).expanduser() / "settings" if config_dir
                                else Path("~", ".config", "wandb", "settings").expanduser())
        s.update_from_system_settings()
        s.update_from_env_vars(dict(os.environ))
    except (ValueError, TypeError, AttributeError):  # a value the SDK refuses (WANDB_MODE=sometimes), an SDK change
        return _from_env()
    base_url = str(s.base_url or "").rstrip("/")
    return SdkDefaults(mode=str(s.mode) if s.mode else None, entity=s.entity or None, project=s.project or None,
                       dir=os.environ.get("WANDB_DIR") or None,  # the SDK's root_dir defaults to the cwd
                       base_url=None if base_url in ("", DEFAULT_BASE_URL) else base_url)
