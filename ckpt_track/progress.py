"""Progress bars for long transfers (object-store uploads and downloads), shown only on a
terminal and only for transfers large enough to be worth watching.  Built on ``rich``; fed by
fsspec's callback protocol, so every fsspec implementation reports into the same bar."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["MIN_BAR_BYTES", "transfer_callback"]

MIN_BAR_BYTES = 64 * 1024 * 1024  # below this a bar would only flicker


def _wanted(total: int) -> bool:
    stream = sys.stderr
    return total >= MIN_BAR_BYTES and bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def transfer_callback(label: str, total: int) -> Iterator[Any]:
    """An fsspec callback advancing a byte-counting bar on stderr (a no-op off a terminal)."""
    from fsspec.callbacks import Callback, NoOpCallback

    if not _wanted(total):
        yield NoOpCallback()
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    lock = threading.Lock()
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        class _Bytes(Callback):  # one file: bytes as they move
            def set_size(self, size: int) -> None:
                return None

            def relative_update(self, inc: int = 1) -> None:
                with lock:
                    bar.advance(task, inc)

            def absolute_update(self, value: int) -> None:
                return None

        class _Files(Callback):  # the whole batch: a child per file
            def set_size(self, size: int) -> None:
                return None

            def relative_update(self, inc: int = 1) -> None:
                return None

            def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
                return _Bytes()

        yield _Files()
