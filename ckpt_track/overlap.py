"""Snapshots that overlap the next training step.

Parameters and optimizer state change only when the optimizer steps.  So, with ``overlap``
on (the default), ``log_checkpoint`` copies only what may change before that step (buffers
such as BatchNorm statistics, which change in forward; everything of a model the optimizer
does not own) before it returns, and the tensors the optimizer owns (its parameters and its
state) are copied into the staging buffers in the background while the next forward and
backward run.  The optimizer's step pre-hook (``Optimizer.register_step_pre_hook``) waits for
those copies; on CUDA they run on a side stream and the optimizer's step waits for them on the
GPU (an event), so the host does not block either.

A deferred tensor can still change before its copy is known to be complete: a manual edit of
a weight, an EMA written into the model with ``copy_``, a restore.  Every deferred tensor's
version counter (``Tensor._version``, bumped by every in-place change) is recorded at the call
and compared after its copy, before the optimizer's step (or, when the optimizer has not
stepped yet, just before the checkpoint is committed); any difference refuses that checkpoint
with an error naming the tensor, so a stored checkpoint is never a mixture of two states.  A
restore into live objects first settles every pending snapshot (:func:`settle_all`), so the
state it loads is not mistaken for such a change.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from .errors import CheckpointWriteError
from .writer import StagedTensors, Writer, snapshot_tensors, wait_staged

T = TypeVar("T")

__all__ = ["Snapshot", "StepGate", "optimizer_tensors", "settle_all"]

_gates: weakref.WeakSet[StepGate] = weakref.WeakSet()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> set[int]:
    """The storages (data pointers) of what ``optimizer.step()`` changes: every parameter of
    its groups and every tensor of its state."""
    owned: set[int] = set()
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        tensors += [v for v in (state.values() if isinstance(state, dict) else ()) if isinstance(v, torch.Tensor)]
    for t in tensors:
        try:
            owned.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass  # no plain storage (a DTensor, a sparse tensor): never deferred
    owned.discard(0)
    return owned


def innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` really runs: wrappers (Accelerate's ``.optimizer``,
    Lightning's ``._optimizer``) call it, and only its own step pre-hooks are sure to fire."""
    seen = {id(optimizer)}
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or id(inner) in seen:
            return optimizer
        seen.add(id(inner))
        optimizer = inner


def deferrable(tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> set[str]:
    """The names of the tensors whose copy may wait for ``optimizer``'s next step: those whose
    storage the optimizer owns (a model parameter it trains, its state).  None for an optimizer
    that takes no step pre-hooks."""
    if optimizer is None or not isinstance(getattr(innermost(optimizer), "_optimizer_step_pre_hooks", None), dict):
        return set()
    owned = optimizer_tensors(optimizer)
    return {name for name, t in tensors.items()
            if t.numel() > 0 and type(t).__name__ != "DTensor" and t.untyped_storage().data_ptr() in owned}


class Snapshot:
    """One checkpoint's staged tensors whose optimizer-owned part is still being copied."""

    def __init__(self, step: int, staged: StagedTensors, sources: dict[str, torch.Tensor],
                 names: Collection[str], copier: ThreadPoolExecutor) -> None:
        self.step = step
        self.staged = staged
        # (name, live tensor, its version at the call): checked after the copies
        self._watch = [(name, sources[name].detach(), sources[name]._version) for name in sorted(names)]
        self._events = list(staged.deferred_copied)  # CUDA copies, one event per device's side stream
        self._lock = threading.RLock()
        self._settled = False
        self._problem: str | None = None
        work = list(staged.deferred)
        staged.deferred = []
        self._copies: Future[None] = copier.submit(self._copy, work) if work else _done()

    def _copy(self, work: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """The background copy (snapshot thread): each tensor, then its version check."""
        versions = {name: v for name, _, v in self._watch}
        for name, src, buf in work:
            buf.copy_(src)
            if src._version != versions[name]:
                self._refuse(name, "after log_checkpoint returned, while its background copy ran")
                return

    def _refuse(self, name: str, when: str) -> None:
        with self._lock:
            if self._problem is None:
                self._problem = (
                    f"checkpoint at step {self.step} was refused: tensor {name!r} was changed in place {when}; "
                    "the optimizer's step waits for the background copy of what the optimizer owns, other "
                    "in-place changes cannot, so the checkpoint could mix two states. Change "
                    "parameters through optimizer.step() only, call handle.committed() before changing them "
                    "otherwise, or log with overlap=False (overlap = false in ckpt_track.toml)"
                )

    def wait_copies(self) -> None:
        """Block until every copy into the staging buffers is complete (host side); a copy
        that failed raises here (in the writer thread, which reports it)."""
        self._copies.result()
        for event in self._events:
            event.synchronize()

    def copies_ended(self) -> None:
        """Wait for every copy to end, failed or not (a failure is the writer's to report: the
        training thread never gets it from a hook), device copies included: only then may the
        staging buffers be handed to another save."""
        wait([self._copies])
        for event in self._events:
            event.synchronize()

    def before_step(self) -> None:
        """The optimizer is about to step (its pre-hook, in the training thread): wait for the
        copies (on CUDA the step's stream waits on the GPU, the host does not) and settle."""
        with self._lock:
            if self._settled:
                return
        wait([self._copies])  # a failed copy is the writer's to report
        for event in self._events:  # the GPU waits, not the host
            torch.cuda.current_stream(event.device).wait_event(event)
        self.settle("after log_checkpoint returned and before the optimizer's next step")

    def settle(self, when: str) -> None:
        """Compare every deferred tensor's version with the one at the call (once): a change
        refuses the checkpoint.  Called where nothing changes them meanwhile: in the training
        thread before the step or a restore, or in the writer thread just before the commit."""
        with self._lock:  # held throughout: a commit that settles meanwhile waits for the verdict
            if self._settled:
                return
            self._settled = True
            for name, t, version in self._watch:
                if t._version != version:
                    self._refuse(name, when)
                    break
            self._watch = []  # drop the references to the live tensors

    def before_commit(self) -> None:
        """Just before the checkpoint is committed (writer thread): unless the optimizer's step
        settled it already, check its tensors did not change since the call; refuse it if they did."""
        self.settle("after log_checkpoint returned and before the checkpoint was committed (no optimizer step yet)")
        self.check()

    @property
    def settled(self) -> bool:
        return self._settled

    def check(self) -> None:
        """Raise :class:`CheckpointWriteError` when the checkpoint was refused."""
        if self._problem is not None:
            raise CheckpointWriteError(self._problem)


def _done() -> Future[None]:
    fut: Future[None] = Future()
    fut.set_result(None)
    return fut


class StepGate:
    """The snapshots of one run not settled yet, and the step pre-hooks that wait for them."""

    def __init__(self) -> None:
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt_track-snapshot")
        self._lock = threading.Lock()
        self._open: list[tuple[weakref.ref[torch.optim.Optimizer], Snapshot]] = []
        self._hooks: dict[int, Any] = {}
        _gates.add(self)

    def snapshot(self, step: int, optimizer: torch.optim.Optimizer, staged: StagedTensors,
                 sources: dict[str, torch.Tensor], names: Collection[str]) -> Snapshot:
        """Start the deferred copies of ``staged`` and hold ``optimizer``'s next step until done."""
        snap = Snapshot(step, staged, sources, names, self._copier)
        optimizer = innermost(optimizer)
        with self._lock:
            self._open = [(o, s) for o, s in self._open if not s.settled]  # never drop one unsettled
            self._open.append((weakref.ref(optimizer), snap))
            hooked = self._hooks.get(id(optimizer))
            if hooked is None or hooked[0]() is not optimizer:
                self._hooks[id(optimizer)] = (weakref.ref(optimizer),
                                              optimizer.register_step_pre_hook(self._before_step))
        return snap

    def submit(self, writer: Writer, step: int, tensors: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer | None, *, lineage: Callable[[], dict[str, Any]],
               save: Callable[..., T]) -> Future[T]:
        """Queue a background save on ``writer``: once a slot is free, copy into its staging
        buffers now what may change before ``optimizer``'s next step, and the rest in the
        snapshot thread (``optimizer=None``: everything now); then, in the writer thread,
        ``save(staged, lineage, before_commit=...)`` once the copies are complete."""
        defer = deferrable(tensors, optimizer)

        def stage(buffers: dict[str, torch.Tensor]) -> tuple[StagedTensors, Snapshot | None, dict[str, Any]]:
            staged = snapshot_tensors(tensors, copy=True, buffers=buffers, defer=defer)
            snap = self.snapshot(step, optimizer, staged, tensors, defer) if defer and optimizer is not None else None
            return staged, snap, lineage()

        def job(staged: tuple[StagedTensors, Snapshot | None, dict[str, Any]]) -> T:
            copies, snap, chained = staged
            if snap is None:
                wait_staged(copies)
                return save(copies, chained)
            try:
                snap.wait_copies()
            finally:
                snap.copies_ended()  # a failed copy: the buffers go back only once nothing writes them
                wait_staged(copies)
            snap.check()  # refused while it was copied: do not write it at all
            return save(copies, chained, before_commit=snap.before_commit)

        return writer.submit_staged(stage, job)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._lock:
            mine = [s for o, s in self._open if o() is optimizer]
            self._open = [(o, s) for o, s in self._open if o() is not optimizer and not s.settled]
        for snap in mine:
            snap.before_step()

    def settle_all(self, when: str) -> None:
        """Wait for every pending copy and settle every snapshot (before live tensors change)."""
        with self._lock:
            pending, self._open = [s for _, s in self._open], []
        for snap in pending:
            snap.copies_ended()
            snap.settle(when)

    def close(self) -> None:
        """Settle what is pending, remove the step pre-hooks and stop the snapshot thread."""
        self.settle_all("after log_checkpoint returned and before run.finish()")
        with self._lock:
            hooks, self._hooks = self._hooks, {}
        for _, handle in hooks.values():
            handle.remove()
        self._copier.shutdown(wait=True)
        _gates.discard(self)


def settle_all(when: str = "before a restore") -> None:
    """Settle the pending snapshots of every run in this process (a restore is about to write
    into live tensors that a background copy may still be reading)."""
    for gate in list(_gates):
        gate.settle_all(when)
