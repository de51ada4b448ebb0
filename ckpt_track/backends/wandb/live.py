"""The W&B runs open in this process.

W&B refuses a second ``wandb.init`` of a run already open in the process, so open runs are
shared by every backend instance (a run opened by ``ct.init`` and a second backend built by
``ct.restore`` for the same run): a process-wide table, key -> [live run, holders].  Each
backend instance remembers the keys it holds, to let go of them in ``finish_run`` / ``close``.
"""

from __future__ import annotations

import threading
from typing import Any

from ...errors import BackendError
from ...records import RunInfo

__all__ = ["LiveRuns", "live_run"]

Key = tuple[str, ...]
_LIVE: dict[Key, list[Any]] = {}
_LIVE_LOCK = threading.Lock()


class LiveRuns:
    """The live runs one backend instance holds, within ``scope`` (mode, server)."""

    def __init__(self, *scope: str) -> None:
        self._scope = scope
        self._opened: list[Key] = []  # keys of the live runs this instance holds

    def _key(self, project: str, run_id: str) -> Key:
        return (*self._scope, project, run_id)

    def get(self, project: str, run_id: str) -> Any:
        """The live run of ``project/run_id`` open in this process (by any instance), or None."""
        with _LIVE_LOCK:
            held = _LIVE.get(self._key(project, run_id))
            return held[0] if held else None

    def hold(self, project: str, run_id: str, live: Any) -> None:
        key = self._key(project, run_id)
        with _LIVE_LOCK:
            held = _LIVE.setdefault(key, [live, 0])
            held[1] += 1
            self._opened.append(key)

    def release(self, project: str, run_id: str) -> Any:
        """The live run to finish, once the last holder lets go of it (else None)."""
        key = self._key(project, run_id)
        with _LIVE_LOCK:
            if key not in self._opened or key not in _LIVE:
                return None
            self._opened.remove(key)
            held = _LIVE[key]
            held[1] -= 1
            if held[1] > 0:
                return None
            del _LIVE[key]
            return held[0]

    def held(self) -> list[tuple[str, str]]:
        """``(project, run_id)`` of every run this instance holds and has not released."""
        return [(key[-2], key[-1]) for key in self._opened]


def live_run(live: LiveRuns, run: RunInfo) -> Any:
    """The live W&B run ``run`` was opened as in this process: only that one can log."""
    found = live.get(run.project, run.run_id)
    if found is None:
        raise BackendError(f"{run.ref}: checkpoints can only be logged to a W&B run opened in this process "
                           "(ckpt_track.init); it is not open or already finished")
    return found
