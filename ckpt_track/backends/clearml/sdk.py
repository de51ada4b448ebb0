"""The boundary of the ``clearml`` SDK: importing it, the table that turns its errors (and the
server's) into ``ckpt_track.errors``, and ``Task.init`` without its side effects.

The SDK is imported lazily, inside functions: ``ckpt_track.backends.clearml`` imports (and
parses references) without it installed.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any
from urllib.parse import urlsplit

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

__all__ = ["CREDS", "REPO_DETECTION_KEYS", "ApiFailure", "configured_api_host", "detect_repository", "probe", "sdk",
           "session_kwargs", "task_init", "translate", "user_configured_repo_detection"]

CREDS = "set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (and CLEARML_API_HOST), or run clearml-init"
_UNREACHABLE = ("LoginError", "ConnectionError", "MaxRetryError", "Timeout")


class ApiFailure(Exception):
    """A non-200 answer of the ClearML API (``meta.result_code`` / ``result_subcode``)."""

    def __init__(self, endpoint: str, code: int, subcode: int, msg: str) -> None:
        super().__init__(f"{endpoint}: {code}/{subcode} {msg}")
        self.code, self.subcode, self.msg = code, subcode, msg


def sdk() -> Any:
    """The ``clearml`` module, or ``BackendNotInstalled`` naming the extra that installs it."""
    try:
        import clearml
    except ImportError as exc:
        raise BackendNotInstalled("clearml", "clearml", "clearml") from exc
    return clearml


def _api_error(exc: ApiFailure, doing: str) -> CkptTrackError:
    if exc.code == 401:
        return AuthError(f"ClearML refused the credentials while {doing}: {exc.msg}; {CREDS}")
    if exc.code == 400 and exc.subcode in (101, 201):  # invalid task id / invalid model id
        return CheckpointNotFound(f"ClearML: {exc.msg} (while {doing})")
    return BackendError(f"ClearML server error while {doing}: {exc}")


def is_unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says the server cannot be reached (as opposed to refusing a request)."""
    name, text = type(exc).__name__, str(exc)
    if name == "LoginError" and ("401" in text or "nauthorized" in text):
        return False
    return name in _UNREACHABLE or isinstance(exc, ConnectionError)


def translate(exc: Exception, doing: str) -> CkptTrackError:
    """The ckpt_track error for an SDK or server error met while ``doing`` something (the table
    ``boundary.sdk_errors`` applies)."""
    if isinstance(exc, ApiFailure):
        return _api_error(exc, doing)
    name, text = type(exc).__name__, str(exc)
    if name == "MissingConfigError":
        return AuthError(f"ClearML credentials are missing ({doing}): {CREDS}; or set [clearml] offline = true")
    if name == "LoginError" and not is_unreachable(exc):
        return AuthError(f"ClearML rejected the credentials while {doing}: {text}; check "
                         "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY")
    if is_unreachable(exc):
        return BackendUnavailable(f"ClearML server unreachable while {doing}: {text}")
    if name == "UsageError":
        return ConfigError(f"ClearML: {text}")
    return BackendError(f"ClearML failed while {doing}: {name}: {text}")


# clearml.conf keys that say the user configured the SDK's repository detection themselves
REPO_DETECTION_KEYS = ("sdk.development.vcs_repo_detect_async", "sdk.development.store_uncommitted_code_diff")


def user_configured_repo_detection() -> str | None:
    """The clearml.conf the SDK reads (``CLEARML_CONFIG_FILE``, else ``~/clearml.conf``) when it
    sets one of :data:`REPO_DETECTION_KEYS`, else None."""
    from clearml.backend_config.defs import get_active_config_file
    from clearml.utilities.pyhocon import ConfigFactory

    path = get_active_config_file()
    if not path:
        return None
    try:
        tree = ConfigFactory.parse_file(os.path.expanduser(os.path.expandvars(path)))
    except Exception:  # noqa: BLE001  # the SDK reports a broken file itself, at Task.init
        return None
    return path if any(tree.get(k, None) is not None for k in REPO_DETECTION_KEYS) else None


def detect_repository(option: bool | None) -> bool:
    """Whether ckpt_track's ``Task.init`` lets the SDK detect the repository: ``[clearml]
    detect_repository`` when set; else only when the user's clearml.conf configures that
    detection.  The SDK's default (a background scan that ``Task.close()`` waits up to 300 s
    for) hangs ``run.finish()`` in about one run in five."""
    if option is not None:
        return option
    return user_configured_repo_detection() is not None


def task_init(*, detect_repo: bool = False, **kwargs: Any) -> Any:
    """``Task.init`` without its side effect on training: it reseeds random/numpy/torch
    (ClearML's seed 1337), so the same script would train differently on this backend; and
    without repository detection unless ``detect_repo`` (see :func:`detect_repository`)."""
    from clearml import Task

    frameworks: dict[str, Any] = {"pytorch": False}
    if not detect_repo:
        frameworks["detect_repository"] = False
    seed = _compat.default_seed()  # what Task.set_random_seed last chose, restored after
    Task.set_random_seed(None)
    state = random.getstate()  # the SDK also draws from Python's global generator while starting
    try:
        task = Task.init(auto_connect_frameworks=frameworks, **kwargs)
    finally:
        random.setstate(state)
        Task.set_random_seed(seed)
    if not isinstance(task, Task):  # a StubObject: ClearML's answer in a child of a ClearML process
        raise ConfigError("ClearML's Task.init returned a stub: it takes this process for a child of the "
                          f"process in CLEARML_PROC_MASTER_ID={os.environ.get('CLEARML_PROC_MASTER_ID')!r}; "
                          "unset CLEARML_PROC_MASTER_ID and TRAINS_PROC_MASTER_ID to log from this process")
    return task


def configured_api_host() -> str | None:
    """The API server the user configured (CLEARML_API_HOST / TRAINS_API_HOST, or ``api.api_server``
    / ``api.host`` in clearml.conf), or None: then the SDK would use the public api.clear.ml."""
    from clearml.backend_api.session.defs import ENV_HOST
    from clearml.config import config_obj

    host = ENV_HOST.get() or config_obj.get("api.api_server", None) or config_obj.get("api.host", None)
    return str(host).rstrip("/") if host else None


def session_kwargs() -> dict[str, Any]:
    """ckpt_track's bounds for the one Session it opens (``network.plan``): clearml.conf's
    defaults are 240 retries with backoff up to 120 s.  urllib3 without jitter: no global random."""
    from ...network import current

    p = current()
    n = p.retries
    return {"http_retries_config": {"total": n, "connect": n, "read": n, "redirect": n, "status": n,
                                    "backoff_factor": float(p.backoff_factor)}}


def probe(host: str) -> None:
    """Fail fast on a server that is down: the SDK would retry for minutes."""
    from ...network import current, unavailable_hint

    try:
        parts = urlsplit(host)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"the ClearML API host {host!r} is not a URL ({exc}); fix CLEARML_API_HOST "
                          "or api.api_server in clearml.conf") from exc
    try:
        socket.create_connection((parts.hostname or "", port), timeout=current().attempt_timeout).close()
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot reach the ClearML API server at {host} ({exc.strerror or exc}); "
            f"{unavailable_hint('CLEARML_API_HOST (or api.api_server in clearml.conf)')}, "
            "or set [clearml] offline = true to log without a server"
        ) from exc
