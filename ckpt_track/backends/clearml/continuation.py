"""Resuming an offline run: a new offline session that continues an earlier one.

The SDK cannot reopen an offline session (``Task.init`` offline always makes a new
``offline-<hex>``), so a script restarted with the same ``name`` or ``run_id`` after a crash
would start from step 0.  Instead ``open_run`` finds the newest earlier session of that run
(same project, same ``ckpt_track_run_id=`` tag or task name) and copies its newest checkpoint,
and the one aliased ``best`` when that is another, into the new session, with their aliases.
``run.resume()`` then finds them in the new session as in any resumed run, and the new session
is complete on its own: importing only it (``clearml-task --import-offline-session``) gives a
server task that holds what it resumed from.  The copy keeps its manifest byte for byte (its
lineage still names the earlier session); the new session's user property
``ckpt_track_continues`` names the session it continues.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...plan import by_name
from ...records import RunInfo, RunSpec
from .metadata import P_CONTINUES, artifact_items
from .offline import Sessions
from .package import scratch_dir

if TYPE_CHECKING:
    from .backend import ClearmlBackend

__all__ = ["carry_over", "previous"]


def previous(sessions: Sessions, spec: RunSpec, project: str) -> dict[str, Any] | None:
    """The task document of the session ``spec`` continues: the newest earlier session of its
    run id (or, with no id, its name) in ``project`` that holds a checkpoint, else the newest
    one; None when there is none (or ``spec`` names no run)."""
    if spec.run_id is not None:
        docs = sessions.find(run_id=spec.run_id, project=project)
    elif by_name(spec):
        docs = sessions.find(name=spec.name, project=project)
    else:
        return None
    with_ckpts = [d for d in docs if artifact_items(d)]
    return (with_ckpts or docs or [None])[-1]


def carry_over(backend: ClearmlBackend, source: RunInfo, into: RunInfo) -> None:
    """Copy ``source``'s newest checkpoint (and its ``best``) into the open session ``into``."""
    op = backend.tasks.open[str(into.native.task_id)]
    op.task.set_user_properties(**{P_CONTINUES: str(source.native.task_id)})
    listed = backend.list(source)
    if not listed:
        return
    chosen = {listed[-1].version: listed[-1]}
    for stored in listed:
        if "best" in stored.aliases:
            chosen.setdefault(stored.version, stored)
    tmp = scratch_dir(Path(backend.sessions.dirs()[-1]))
    try:
        for version in sorted(chosen):
            stored = chosen[version]
            ckpt = backend.get(stored, tmp / f"v{version}")
            backend.put(into, ckpt, stored.aliases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
