"""The boundary of a tracker SDK: one helper every backend uses to turn the SDK's
exceptions into ``ckpt_track.errors``, and the small probes the backends' mapping tables need."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import CkptTrackError

__all__ = ["http_status", "sdk_errors"]


@contextmanager
def sdk_errors(translate: Callable[[Exception, str], CkptTrackError], what: str) -> Iterator[None]:
    """The boundary of a tracker SDK: ckpt_track errors pass, anything else becomes
    ``translate(exc, what)``, chained to the original."""
    try:
        yield
    except CkptTrackError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc


def http_status(exc: BaseException) -> int | None:
    """The HTTP status somewhere in an SDK error's chain (``__cause__``, ``__context__`` and a
    wrapped ``exc``), read from ``response.status_code`` / ``response.http_status`` or the
    error's own ``status_code``; None when there is none."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        response = getattr(e, "response", None)
        for value in (getattr(response, "http_status", None), getattr(response, "status_code", None),
                      getattr(e, "status_code", None)):
            if isinstance(value, int) and 100 <= value <= 599:
                return value
        todo.extend([e.__cause__, e.__context__, getattr(e, "exc", None)])
    return None
