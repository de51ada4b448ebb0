"""The private parts of the ``clearml`` SDK this backend relies on, where the SDK has no public
API for what is needed: all of them here, nowhere else in the package.

- ``Task._random_seed`` (class attribute): the seed ``Task.set_random_seed`` last chose.  The
  SDK has a setter but no class-level getter (``Task.get_random_seed`` is an instance method of
  an already initialised task), and ``sdk.task_init`` must put the user's choice back after it
  turned reseeding off for its own ``Task.init``.
- ``Session._session_initial_timeout`` / ``Session._session_timeout``: the SDK's per-request
  timeouts (3/10 s first, then 10/300 s), class attributes with no option or argument; set on
  the one session ckpt_track opens so a silent server fails within ``network``'s bounds.
- ``task._artifacts_manager._task_artifact_list``: the artifacts this process uploaded.  The SDK
  sends that whole list again with every upload, so an artifact removed by
  ``Task.delete_artifacts`` would come back with the next one (clearml 2.1); deleting must
  drop it from the list too.

Each accessor degrades to doing nothing when the SDK changed (a user's training must not fail
on it), and :func:`problems` says what is missing: ``tests/backends/test_backend_clearml.py`` asserts it
is empty against the installed SDK, so an SDK update that moves one fails there, loudly.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from typing import Any

__all__ = ["default_seed", "forget_uploaded", "problems", "set_request_timeout"]


def default_seed() -> Any:
    """The random seed new tasks get (what ``Task.set_random_seed`` last set; True, the SDK's
    default, when the attribute is gone)."""
    from clearml import Task

    return getattr(Task, "_random_seed", True)


def set_request_timeout(session: Any, seconds: float) -> None:
    """Bound every request of ``session`` (a ``clearml.backend_api.Session``) to ``seconds``
    for connecting and for reading."""
    for attr in ("_session_initial_timeout", "_session_timeout"):
        if hasattr(type(session), attr):
            setattr(session, attr, (seconds, seconds))


def forget_uploaded(task: Any, keys: Collection[str]) -> None:
    """Drop the artifacts ``keys`` from what ``task``'s artifact manager re-sends with its next
    upload (see the module docstring)."""
    uploaded = getattr(getattr(task, "_artifacts_manager", None), "_task_artifact_list", None)
    if isinstance(uploaded, list):
        uploaded[:] = [a for a in uploaded if getattr(a, "key", None) not in keys]


def problems(task: Any = None) -> list[str]:
    """What of the above the installed SDK no longer has (empty when all is in place); with an
    open ``task``, its artifact manager is checked too."""
    from clearml import Task
    from clearml.backend_api import Session
    from clearml.binding.artifacts import Artifacts

    found = []
    if not hasattr(Task, "_random_seed"):
        found.append("Task._random_seed is gone")
    else:
        before = Task._random_seed
        try:
            Task.set_random_seed(4321)
            if Task._random_seed != 4321:
                found.append("Task.set_random_seed no longer sets Task._random_seed")
        finally:
            Task._random_seed = before
    for attr in ("_session_initial_timeout", "_session_timeout"):
        value = getattr(Session, attr, None)
        if not (isinstance(value, tuple) and len(value) == 2):
            found.append(f"Session.{attr} is not a (connect, read) timeout pair: {value!r}")
        if attr not in inspect.getsource(Session.send_request) + inspect.getsource(Session._send_request):
            found.append(f"Session requests no longer read {attr}")
    if "_task_artifact_list" not in inspect.getsource(Artifacts):
        found.append("Artifacts no longer keeps _task_artifact_list")
    if task is not None and not isinstance(getattr(getattr(task, "_artifacts_manager", None),
                                                   "_task_artifact_list", None), list):
        found.append("task._artifacts_manager._task_artifact_list is not a list")
    return found
