"""How ckpt_track's processes talk to trackers: bounded timeouts and retries, no telemetry.

:func:`configure` is called by :func:`ckpt_track.resolve.open_backend` before a backend is
created.  It sets each tracker SDK's own documented knobs, as environment variables of this
process, so that a tracker that is down or does not answer makes one ckpt_track operation
fail after about ``Settings.timeout`` seconds (``timeout`` / ``CKPT_TRACK_TIMEOUT``, default
10) with :class:`~ckpt_track.errors.BackendUnavailable`, instead of the SDK defaults of
minutes (MLflow: 120 s per attempt, 7 retries; ClearML: 240 retries).

``timeout`` is the budget of one tracker call, not of one attempt: the SDK makes
``1 + retries`` attempts (``retries`` / ``CKPT_TRACK_RETRIES``, default 2), each with an equal
share of the budget as its connect and read timeout (at least 1 s), and backs off between
them only as far as the budget allows.  These are socket timeouts (time to connect, time
between bytes), never a limit on a whole transfer, so large uploads are not cut off.

Every variable is set with ``setdefault`` semantics: a value already in the environment (the
user's own choice) wins, and a later :func:`configure` with other settings only replaces
values ckpt_track itself set.  The exception is retry jitter, which is always forced to 0:
urllib3's ``Retry`` (MLflow's retries) calls ``random.random()`` on the global generator for
every backoff when ``backoff_jitter != 0``, and nothing ckpt_track runs, often on a background
thread during training, may consume the global ``random``, NumPy or torch generators: it
would change what a seeded training run draws next.

Variables set (SDK, what it does, when the SDK reads it):

MLflow (read on every request, except telemetry: at ``import mlflow`` and on every event)
  ``MLFLOW_HTTP_REQUEST_TIMEOUT``         connect/read timeout of one attempt, whole seconds
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``     retries of one REST/artifact request (urllib3 Retry)
  ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``  urllib3 backoff factor (sleep factor * 2**(n-1))
  ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``  forced to ``0``: jitter draws from global ``random``
  ``MLFLOW_DISABLE_TELEMETRY``            ``true``: no usage events to MLflow's collector (its
                                          client also draws ``random.randint`` for sampling)
W&B (read when the SDK builds its settings: first ``wandb.init`` / ``wandb.Api`` of the process;
``WANDB_HTTP_TIMEOUT`` also at ``import wandb.apis.public``, and by ckpt_track per ``Api``)
  ``WANDB_HTTP_TIMEOUT``                  GraphQL request timeout (whole seconds)
  ``WANDB__GRAPHQL_RETRY_MAX``            retries of one GraphQL request (done in wandb-core)
  ``WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS`` longest wait between those retries
  ``WANDB__FILE_TRANSFER_RETRY_MAX``      retries of one file upload/download (no timeout is
                                          set for transfers: wandb-core's is per whole request)
  ``WANDB_ERROR_REPORTING``               ``false``: no crash reports to W&B's Sentry
Comet (read from the environment on every ``comet_ml.get_config()``, i.e. per experiment/API;
error tracking at ``import comet_ml``)
  ``COMET_TIMEOUT_HTTP`` / ``COMET_TIMEOUT_API``  connect/read timeout, whole seconds
  ``COMET_HTTP_SESSION_RETRY_TOTAL``      retries of one REST request (urllib3 Retry, no jitter)
  ``COMET_HTTP_SESSION_RETRY_BACKOFF_FACTOR`` urllib3 backoff factor
  ``COMET_ERROR_TRACKING_ENABLE``         ``false``: no Sentry error reports to Comet
  ``COMET_DISABLE_ANNOUNCEMENT``          ``true``: no announcement fetch from Comet's servers
ClearML has no environment knobs for these (its retries and timeouts live in ``clearml.conf``
and ``Session`` class attributes); the ClearML backend passes :func:`plan` to the one
``Session`` it creates for reads (``http_retries_config``, per-session timeouts) and to its
reachability probe, and leaves the user's ``clearml.conf`` and Task sessions alone.

Global random generators: MLflow (urllib3 jitter, telemetry sampling) is covered above;
ClearML's retries use urllib3 without jitter, and its ``Task.init`` reseeding is undone by the
ClearML backend; W&B's Python retry helper (``wandb.sdk.lib.retry``, used by
``Artifact.download``) multiplies its sleeps by ``1 + random.random()`` and has no setting for
it, so the W&B backend points that module at a private generator (:func:`private_random`);
``import comet_ml`` draws one ``random.random()`` to decide on error tracking, so the Comet
backend imports it with the global generator's state saved and restored (:func:`keep_random`).
"""

from __future__ import annotations

import os
import random
import threading
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Plan", "applied", "configure", "describe", "keep_random", "plan", "private_random", "unavailable_hint"]


@dataclass(frozen=True)
class Plan:
    """How one tracker call is bounded: ``attempts`` of ``attempt_timeout`` seconds each, with
    urllib3-style backoff ``backoff_factor`` between them (sleeps 0, 2f, 4f, ...)."""

    timeout: float  # the budget (Settings.timeout)
    retries: int
    attempt_timeout: float
    backoff_factor: int

    @property
    def attempt_seconds(self) -> int:
        """``attempt_timeout`` in whole seconds, for SDKs that only take integers (at least 1)."""
        return max(1, int(self.attempt_timeout))


def plan(timeout: float = 10.0, retries: int = 2) -> Plan:
    """Split a budget of ``timeout`` seconds over ``1 + retries`` attempts.

    >>> p = plan(10.0, 2)
    >>> (p.attempt_seconds, p.backoff_factor)
    (2, 1)
    """
    attempts = retries + 1
    factor = 1
    backoff = factor * (2**retries - 2) if retries >= 2 else 0  # urllib3: no sleep before the 1st retry
    if backoff >= timeout / 2:  # retries must not eat the budget: back off only when it fits
        factor, backoff = 0, 0
    per_attempt = max(1.0, (timeout - backoff) / attempts)
    return Plan(float(timeout), int(retries), per_attempt, factor)


def _variables(p: Plan) -> dict[str, str]:
    """The setdefault variables for a plan (the forced ones are in :data:`_FORCED`)."""
    secs = str(p.attempt_seconds)
    retries = str(p.retries)
    return {
        # MLflow
        "MLFLOW_HTTP_REQUEST_TIMEOUT": secs,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(p.backoff_factor),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # W&B
        "WANDB_HTTP_TIMEOUT": secs,
        "WANDB__GRAPHQL_RETRY_MAX": retries,
        "WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS": str(max(1, p.backoff_factor * 4)),
        "WANDB__FILE_TRANSFER_RETRY_MAX": retries,
        "WANDB_ERROR_REPORTING": "false",
        # Comet
        "COMET_TIMEOUT_HTTP": secs,
        "COMET_TIMEOUT_API": secs,
        "COMET_HTTP_SESSION_RETRY_TOTAL": retries,
        "COMET_HTTP_SESSION_RETRY_BACKOFF_FACTOR": str(p.backoff_factor),
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_DISABLE_ANNOUNCEMENT": "true",
    }


# set whatever the environment says: jitter would draw from the global `random` generator
_FORCED = {"MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}

_lock = threading.Lock()
_current: Plan | None = None
_ours: dict[str, str] = {}  # variable -> the value ckpt_track set (and still holds)
_kept: dict[str, str] = {}  # variable -> the user's own value, which ckpt_track left alone


def configure(settings: Any = None) -> Plan:
    """Apply ``settings.timeout`` / ``settings.retries`` and the telemetry opt-outs to this
    process (see the module docstring); cheap and idempotent, so it runs before every backend.

    Returns the :class:`Plan` in force.
    """
    global _current
    timeout = float(getattr(settings, "timeout", 10.0))
    retries = int(getattr(settings, "retries", 2))
    p = plan(timeout, retries)
    with _lock:
        # applied again even for the same settings (a few dict lookups): a variable removed from
        # the environment since, above all the forced jitter, is put back
        for name, value in {**_variables(p), **_FORCED}.items():
            now = os.environ.get(name)
            if name in _FORCED or now is None or _ours.get(name) == now:
                os.environ[name] = value
                _ours[name] = value
                _kept.pop(name, None)
            else:  # the user's own setting
                _ours.pop(name, None)
                _kept[name] = now
        _current = p
    return p


def current() -> Plan:
    """The plan in force (the defaults before the first :func:`configure`)."""
    return _current if _current is not None else plan()


def applied() -> Mapping[str, str]:
    """The variables ckpt_track set in this process, with their values."""
    with _lock:
        return dict(_ours)


def describe() -> str:
    """A short human description of what :func:`configure` applied (for docs and ``--verbose``)."""
    p = current()
    with _lock:
        ours, kept = dict(_ours), dict(_kept)
    lines = [
        (f"tracker calls fail after about {p.timeout:g} s (timeout / CKPT_TRACK_TIMEOUT): "
         f"{p.retries + 1} attempt(s) of {p.attempt_timeout:.3g} s connect/read timeout each, "
         f"backoff factor {p.backoff_factor} (retries / CKPT_TRACK_RETRIES = {p.retries})"),
        ("retry jitter forced to 0 (it would draw from the global random generator); "
         "SDK telemetry and error reporting off unless you turned it on"),
    ]
    if ours:
        lines.append("set: " + ", ".join(f"{k}={v}" for k, v in sorted(ours.items())))
    if kept:
        lines.append("yours, left as they are: " + ", ".join(f"{k}={v}" for k, v in sorted(kept.items())))
    return "\n".join(lines)


def unavailable_hint(uri_setting: str) -> str:
    """The tail of a BackendUnavailable message: which settings to change."""
    return (f"check that the server is running and {uri_setting} points at it; if it is only slow, "
            f"raise `timeout` (CKPT_TRACK_TIMEOUT, now {current().timeout:g} s)")


def private_random(module: types.ModuleType) -> None:
    """Point a module's ``random`` global at a private generator, so its draws (retry jitter)
    leave the global one alone.  Only for SDK modules that do ``import random`` and call
    ``random.random()`` for backoff, with no setting to turn that off."""
    if isinstance(getattr(module, "random", None), types.ModuleType):
        module.random = random.Random()  # type: ignore[attr-defined]


@contextmanager
def keep_random() -> Iterator[None]:
    """Restore the global ``random`` generator's state afterwards (for an SDK import that draws
    from it); use on the thread that imports, before training draws concurrently."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def _reset_for_tests() -> None:
    """Forget what was applied, and remove the variables ckpt_track set."""
    global _current
    with _lock:
        for name, value in _ours.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        _ours.clear()
        _kept.clear()
        _current = None
