"""The upload thread: stores spooled checkpoints in their trackers, behind the training loop.

The save is the commit to the spool (:mod:`ckpt_track.writer`); tracker I/O happens here,
in one daemon thread, so no ``log_checkpoint`` call ever waits on the network.  A pass
uploads everything owed, lowest step first.  When a tracker is unreachable the thread
backs off on a fixed schedule (1, 2, 4, ... seconds, at most ``max_backoff``; never
random, so it consumes no global random generator) and tries again; a new checkpoint
or ``finish()`` starts a pass at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .writer import lower_priority

__all__ = ["Uploader", "backoff_schedule"]

log = logging.getLogger("ckpt_track")


def backoff_schedule(attempt: int, first: float = 1.0, most: float = 60.0) -> float:
    """Seconds to wait before retry ``attempt`` (1-based) of a pass that found a tracker down."""
    return min(most, first * 2 ** max(0, attempt - 1))


class Uploader:
    """Runs ``drain(retry)`` in a background thread whenever asked, and again with backoff while
    it reports deferred uploads (``drain`` returns something with a truthy ``deferred``).
    ``retry`` is True for a pass asked for with ``kick(retry=True)``."""

    def __init__(self, drain: Callable[[bool], Any], *, first_backoff: float = 1.0,
                 max_backoff: float = 60.0) -> None:
        self._drain = drain
        self._first, self._most = first_backoff, max_backoff
        self._cv = threading.Condition()
        self._requested = 0  # passes asked for
        self._completed = 0  # passes asked for that have ended
        self._stopping = False
        self._retry = False
        self._thread = threading.Thread(target=self._loop, name="ckpt_track-uploader", daemon=True)
        self._thread.start()

    def kick(self, retry: bool = False) -> int:
        """Ask for a pass (``retry``: one that first gives refused uploads another try); returns
        a ticket for :meth:`wait`."""
        with self._cv:
            self._retry = self._retry or retry
            self._requested += 1
            self._cv.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout: float | None = None) -> bool:
        """Wait until the pass asked for with ``ticket`` (or a later one) has ended."""
        with self._cv:
            return self._cv.wait_for(lambda: self._completed >= ticket or self._stopping, timeout)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        lower_priority()
        attempt = 0
        while True:
            with self._cv:
                while not self._stopping and self._completed >= self._requested:
                    if attempt and not self._cv.wait(backoff_schedule(attempt, self._first, self._most)):
                        break  # backoff over: retry the deferred uploads
                    if not attempt:
                        self._cv.wait()
                if self._stopping:
                    self._cv.notify_all()
                    return
                ticket, retry, self._retry = self._requested, self._retry, False
            try:
                result = self._drain(retry)
            except BaseException as exc:  # noqa: BLE001 - never let the thread die: report, retry later
                log.error("ckpt_track: uploading spooled checkpoints failed: %s", exc)
                result = None
                attempt += 1
            else:
                attempt = attempt + 1 if getattr(result, "deferred", None) else 0
            with self._cv:
                self._completed = max(self._completed, ticket)
                self._cv.notify_all()
