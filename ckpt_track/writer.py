"""Background checkpoint writer: snapshot in the caller, write and upload off-thread.

``log_checkpoint`` copies the state into tensors it owns (so training can go on
mutating its own), then hands the job to one worker thread.  At most
``max_in_flight`` jobs exist at once: a further call waits (back-pressure, which
also bounds memory).  A failed job is re-raised on the next call and at
``finish()``; pending jobs complete before the interpreter exits.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .errors import CheckpointWriteError
from .format.serialize import aligned_empty

__all__ = ["StagedTensors", "Writer", "lower_priority", "snapshot_tensors", "wait_staged"]

T = TypeVar("T")
S = TypeVar("S")


def _owned(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0)


class StagedTensors(dict[str, torch.Tensor]):
    """What :func:`snapshot_tensors` returns: the tensors, and the CUDA events at which their
    device-to-host copies are complete (``copied``: one per device; empty when nothing is in
    flight).

    The events travel with the tensors they guard, so waiting on them needs no table on the
    side (one keyed by ``id()`` could hand a dead snapshot's event to a new one at the same
    address, and kept the events of snapshots nobody waited for).

    ``deferred`` lists the CPU tensors named in ``defer`` whose copy was left to the caller
    (``(name, source, buffer)``: ``buffer`` is already in the mapping, not yet filled);
    ``deferred_copied`` holds the events of the deferred device copies (one per device), which
    the caller's streams do not wait for (:mod:`ckpt_track.overlap`)."""

    copied: list[Any]  # torch.cuda.Event per device
    deferred: list[tuple[str, torch.Tensor, torch.Tensor]]
    deferred_copied: list[Any]

    def __init__(self) -> None:
        super().__init__()
        self.copied = []
        self.deferred = []
        self.deferred_copied = []


def _buffer(name: str, t: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The staging buffer for ``t``: the one from an earlier save when shape and dtype still
    match, else a new one (pinned for a CUDA source), aligned so that a direct write reads it
    in place (``ckpt_track.format.serialize``)."""
    buf = buffers.get(name)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = aligned_empty(t.shape, t.dtype, pin_memory=t.is_cuda)
        buffers[name] = buf
    return buf


class _SideStreams:
    """One side stream per CUDA device for device-to-host copies, each starting after what the
    loop queued on that device so far (a copy of a ``cuda:1`` tensor must be ordered on
    ``cuda:1``)."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, Any] = {}

    def copy(self, buf: torch.Tensor, t: torch.Tensor) -> None:
        side = self.streams.get(t.device)
        if side is None:
            side = self.streams[t.device] = torch.cuda.Stream(device=t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))  # copy what the loop computed so far
        with torch.cuda.stream(side):
            buf.copy_(t, non_blocking=True)
        t.record_stream(side)  # keep the caching allocator from reusing t's memory mid-copy

    def events(self) -> list[Any]:
        return [side.record_event() for side in self.streams.values()]


def snapshot_tensors(tensors: Mapping[str, torch.Tensor], *, copy: bool,
                     buffers: dict[str, torch.Tensor] | None = None,
                     defer: Collection[str] = ()) -> StagedTensors:
    """Contiguous CPU tensors that share no memory (what safetensors needs).

    With ``copy=True`` every tensor is copied, so the caller may keep training
    while the copy is written; otherwise only views and device tensors are.
    ``buffers`` is a staging set reused across calls: a buffer whose shape and
    dtype still match is overwritten instead of allocating a new one (pinned
    memory for CUDA sources).  CUDA copies are issued on a side stream per device that the
    caller's stream on that device then waits on; with ``copy=True`` the host never blocks
    on them here and the writer thread waits for them before reading (:func:`wait_staged`),
    with ``copy=False`` (a save that writes at once) they are waited for here.

    Tensors named in ``defer`` (``copy=True`` only) get their buffers but are not copied
    before this returns: a CPU one is listed in ``deferred`` for the caller to copy, a CUDA
    one is copied on the side stream after the others, and the caller's stream does not wait
    for it (``deferred_copied``; see :mod:`ckpt_track.overlap`).
    """
    buffers = {} if buffers is None else buffers
    out = StagedTensors()
    sides = _SideStreams()
    later: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, t in tensors.items():
        t = t.detach()
        if not copy and _owned(t):
            out[name] = t
            continue
        buf = _buffer(name, t, buffers)
        out[name] = buf
        if copy and name in defer:
            if t.is_cuda:
                later.append((t, buf))
            else:
                out.deferred.append((name, t, buf))
        elif t.is_cuda:
            sides.copy(buf, t)
        else:
            buf.copy_(t)
    for name in set(buffers) - set(tensors):
        del buffers[name]  # tensors that went away: free their staging memory
    if sides.streams:
        out.copied = sides.events()
        for device, side in sides.streams.items():
            torch.cuda.current_stream(device).wait_stream(side)  # later GPU writes wait for the copies
        if not copy:  # a synchronous save writes these at once: the host copies must be complete
            wait_staged(out)
    if later:
        for t, buf in later:
            sides.copy(buf, t)
        out.deferred_copied = sides.events()  # waited by the optimizer step, not by the next kernel
    return out


def wait_staged(staged: Mapping[str, torch.Tensor]) -> None:
    """Block until the device-to-host copies into ``staged`` have finished (the writer thread,
    or a blocking save, before anything reads the host copies)."""
    if isinstance(staged, StagedTensors):
        events = [*staged.copied, *staged.deferred_copied]
        staged.copied, staged.deferred_copied = [], []
        for event in events:
            event.synchronize()


WRITER_NICENESS = 10


def lower_priority() -> None:
    """Run the writer thread at a lower CPU priority than training (Linux: per thread), so on
    a machine with few cores hashing and serializing yield to the training loop's compute."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere setpriority takes a process id, not a thread's
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass  # not permitted: run at normal priority


class Writer:
    """One background worker with a bounded number of jobs in flight."""

    def __init__(self, max_in_flight: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt_track-writer",
                                        initializer=lower_priority)
        self._slots = threading.BoundedSemaphore(max(1, max_in_flight))
        # one reusable staging set per slot: a set is never overwritten while its job runs
        self._staging: list[dict[str, torch.Tensor]] = [{} for _ in range(max(1, max_in_flight))]
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._errors: list[BaseException] = []
        self._acknowledged: list[BaseException] = []  # errors a handle already raised
        self._closed = False

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` in the background (after a free slot is available)."""
        return self.submit_staged(lambda _buffers: None, lambda _staged: job())

    def submit_staged(self, stage: Callable[[dict[str, torch.Tensor]], S], job: Callable[[S], T]) -> Future[T]:
        """Wait for a free slot, run ``stage(buffers)`` here with that slot's reusable staging
        buffers, then ``job(staged)`` in the background; the buffers are reused only after it ends."""
        self.raise_errors()
        if self._closed:
            raise CheckpointWriteError("this run is finished; start a new one with ct.init()")
        self._slots.acquire()  # back-pressure: wait for a free slot (and its staging buffers)
        with self._lock:
            buffers = self._staging.pop()
        try:
            self.raise_errors()  # the job we just waited for may have failed
            staged = stage(buffers)
            fut = self._pool.submit(job, staged)
        except BaseException:
            self._give_back(buffers)
            raise
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(lambda f: self._done(f, buffers))
        return fut

    def _give_back(self, buffers: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._staging.append(buffers)
        self._slots.release()

    def _done(self, fut: Future[Any], buffers: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._pending.discard(fut)
            exc = fut.exception()
            if exc is not None and not any(exc is e for e in self._acknowledged):
                self._errors.append(exc)
        self._give_back(buffers)

    def acknowledge(self, exc: BaseException) -> None:
        """The caller has seen ``exc`` (through a handle): do not raise it again (also when the
        job's done-callback has not recorded it yet)."""
        with self._lock:
            self._errors = [e for e in self._errors if e is not exc]
            self._acknowledged.append(exc)

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
                except BaseException:  # noqa: BLE001, S110 - collected by _done, raised below
                    pass
        self.raise_errors()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
