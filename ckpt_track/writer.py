"""Background checkpoint writer: snapshot in the caller, write and upload off-thread.

``log_checkpoint`` copies the state into tensors it owns (so training can go on
mutating its own), then hands the job to one worker thread.  At most
``max_in_flight`` jobs exist at once: a further call waits (back-pressure, which
also bounds memory).  A failed job is re-raised on the next call and at
``finish()``; pending jobs complete before the interpreter exits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .errors import CheckpointWriteError

__all__ = ["Writer", "snapshot_tensors"]

T = TypeVar("T")


def _owned(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0)


def snapshot_tensors(tensors: Mapping[str, torch.Tensor], *, copy: bool) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (what safetensors needs).

    With ``copy=True`` every tensor is copied, so the caller may keep training
    while the copy is written; otherwise only views and device tensors are.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach()
        if copy or not _owned(t):
            dst = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            dst.copy_(t)
            t = dst
        out[name] = t
    return out


class Writer:
    """One background worker with a bounded number of jobs in flight."""

    def __init__(self, max_in_flight: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt_track-writer")
        self._slots = threading.BoundedSemaphore(max(1, max_in_flight))
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._errors: list[BaseException] = []
        self._closed = False

    def submit(self, job: Callable[[], T]) -> Future[T]:
        self.raise_errors()
        if self._closed:
            raise CheckpointWriteError("this run is finished; start a new one with ct.init()")
        self._slots.acquire()  # back-pressure: wait for a free slot
        try:
            self.raise_errors()  # the job we just waited for may have failed
            fut = self._pool.submit(job)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)
            exc = fut.exception()
            if exc is not None:
                self._errors.append(exc)
        self._slots.release()

    def raise_errors(self) -> None:
        """Re-raise (once) the first error of a finished background job."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            if isinstance(first, CheckpointWriteError):
                raise CheckpointWriteError(f"{first}{more}") from first.__cause__ or first
            raise CheckpointWriteError(f"a background checkpoint save failed: {first}{more}") from first

    def flush(self) -> None:
        """Wait for every pending job; then raise the first error, if any."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            for fut in pending:
                try:
                    fut.result()
                except BaseException:
                    pass  # collected by _done, raised below
        self.raise_errors()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
