"""The W&B SDK internals the backend relies on, where the SDK has no public API for them.

Each one breaks silently when the SDK changes, so they live here, and
``tests/backends/test_backend_wandb.py::test_compat_shims_match_the_installed_sdk`` fails loudly
(:func:`problems`) when one of them no longer holds:

- ``wandb.sdk.lib.retry`` draws its backoff jitter from the module-level ``random``; there is
  no setting for it, so :func:`keep_retries_off_global_random` points that global at a private
  generator (a training's seeded ``random`` stream must not depend on W&B's retries);
- ``wandb.apis.public.runs.RunNotFoundError`` is what ``Api.run`` raises for an unknown run,
  but it is not in ``wandb.apis.public.__all__``;
- ``Api.runs`` of a project the server does not know raises a bare ``ValueError`` whose text
  is the only way to tell it from another failure (:func:`is_missing_project`).

Import this module only where the SDK is needed: it imports ``wandb``.
"""

from __future__ import annotations

import inspect
import random
import types

import wandb.apis.public.runs
import wandb.sdk.lib.retry
from wandb.apis.public.runs import RunNotFoundError

from ...network import private_random

__all__ = ["RunNotFoundError", "is_missing_project", "keep_retries_off_global_random", "problems"]

_MISSING_PROJECT = "Could not find project"


def keep_retries_off_global_random() -> None:
    """W&B's retry backoff draws ``random.random()``: give that module its own generator."""
    private_random(wandb.sdk.lib.retry)


def is_missing_project(exc: BaseException) -> bool:
    """Whether ``Api.runs(...)`` failed because the project has no runs yet."""
    return isinstance(exc, ValueError) and _MISSING_PROJECT in str(exc)


def problems() -> list[str]:
    """What no longer holds in the installed SDK (empty when every shim still fits)."""
    found = []
    retry = getattr(wandb.sdk.lib.retry, "random", None)
    if not isinstance(retry, (types.ModuleType, random.Random)):
        found.append("wandb.sdk.lib.retry no longer draws from a module-level `random`")
    if not (isinstance(RunNotFoundError, type) and issubclass(RunNotFoundError, Exception)):
        found.append("wandb.apis.public.runs.RunNotFoundError is not an exception class")
    if _MISSING_PROJECT not in _source(wandb.apis.public.runs):
        found.append(f"the SDK no longer says {_MISSING_PROJECT!r} for an unknown project")
    return found


def _source(module: types.ModuleType) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""
