"""Talking to the other ranks: the process group, the run handshake and JSON collectives.

Nothing here pickles.  The handshake of ``init`` goes through the process group's own
key-value store (rank 0 publishes the run it opened as JSON; the other ranks read it), so
rank 0 never blocks on ranks that do not call ``ct.init`` (code that logs from rank 0 only).
Once every rank has joined, two dedicated gloo groups carry ckpt_track's collectives, with
``collective_timeout``: one for the background saves (the writer thread of every rank), one
for the calls of the training thread (resume, finish); training's own process group is
never used, so a save cannot interleave with the loop's all-reduces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CkptTrackError, ConfigError, DistributedError
from ._compat import default_store

__all__ = ["Comm", "active", "all_ok", "broadcast_json", "first_failure", "handshake", "rank_and_world", "timed_out"]

log = logging.getLogger("ckpt_track")
_PREFIX = "ckpt_track"
_counter = 0  # ct.init calls under a process group in this process: one key space each
JOIN_GRACE = 15.0  # seconds rank 0 waits, in "auto" mode, for the other ranks to call ct.init


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Comm:
    """This rank's place in a collective run and the groups its collectives use."""

    rank: int
    world: int
    timeout: float
    save_group: Any = None  # the writer threads' collectives
    control_group: Any = None  # the training thread's collectives (resume, finish)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def open_groups(self) -> None:
        """Create the dedicated gloo groups (collective: every rank, same order)."""
        t = timedelta(seconds=self.timeout)
        self.save_group = dist.new_group(backend="gloo", timeout=t)
        self.control_group = dist.new_group(backend="gloo", timeout=t)


def handshake(mode: str, timeout: float, publish: Any) -> tuple[Comm | None, dict[str, Any] | None]:
    """The collective part of ``ct.init``: ``(comm, run identity)``, or ``(None, None)`` when
    this rank is to work as a single process (``distributed="off"``, no process group, or
    rank 0 alone in ``"auto"`` mode because no other rank called ``ct.init``).

    ``publish`` is called on rank 0 only and returns the run identity (a JSON object), or
    raises; its error reaches every rank.  Other ranks wait up to ``timeout`` for it."""
    global _counter
    if mode == "off" or not active():
        if mode == "on" and not active():
            raise ConfigError("distributed='on' but no torch.distributed process group of more than one rank "
                              "is initialized; call torch.distributed.init_process_group first")
        return None, None
    rank, world = rank_and_world()
    _counter += 1
    ns = f"{_PREFIX}/{_counter}"
    store = default_store()
    if rank != 0:
        store.set(f"{ns}/joined/{rank}", "1")
        msg = _get_json(store, f"{ns}/run", timeout,
                        f"rank 0 did not publish the run within {timeout:g} s (collective_timeout): every rank "
                        "calls ct.init at the same point of the script")
        if not msg.get("ok"):
            raise DistributedError(f"rank 0 could not start the run: {msg.get('error')}")
        if msg.get("mode") != "collective":
            raise DistributedError(
                "rank 0 started the run alone (this rank called ct.init too late); call ct.init on every rank "
                "before training, or set distributed='on' so rank 0 waits for every rank")
        comm = Comm(rank, world, timeout)
        comm.open_groups()
        return comm, msg["run"]
    wait = timeout if mode == "on" else min(JOIN_GRACE, timeout)
    solo = not _wait_joined(store, ns, world, wait)
    if solo and mode == "on":
        err = (f"not every rank called ct.init within {timeout:g} s (collective_timeout); with distributed='on' "
               "every rank calls it")
        store.set(f"{ns}/run", json.dumps({"ok": False, "error": err}))
        raise DistributedError(err)
    try:
        identity = publish()
    except BaseException as exc:
        store.set(f"{ns}/run", json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        raise
    store.set(f"{ns}/run", json.dumps({"ok": True, "mode": "solo" if solo else "collective", "run": identity}))
    if solo:
        log.warning("ckpt_track: no other rank called ct.init within %.0f s: this run records rank 0's state "
                    "only (enough for DDP; FSDP and tensor parallel need every rank to call ct.init, "
                    "log_checkpoint and resume). Pass distributed='off' on rank 0 to skip this wait", wait)
        return None, identity
    comm = Comm(0, world, timeout)
    comm.open_groups()
    return comm, identity


def _wait_joined(store: Any, ns: str, world: int, wait: float) -> bool:
    keys = [f"{ns}/joined/{r}" for r in range(1, world)]
    try:
        store.wait(keys, timedelta(seconds=wait))
    except (RuntimeError, dist.DistError):  # DistStoreError on a timeout
        return False
    return True


def _get_json(store: Any, key: str, timeout: float, why: str) -> dict[str, Any]:
    try:
        store.wait([key], timedelta(seconds=timeout))
        data = json.loads(store.get(key).decode())
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedError(f"{why} ({exc})") from exc
    if not isinstance(data, dict):
        raise DistributedError(f"the process group's store holds a malformed {key!r}")
    return data


# -- JSON collectives (no pickle) -------------------------------------------------------------
def broadcast_json(obj: Any, group: Any, what: str, timeout: float) -> Any:
    """``obj`` of rank 0 on every rank of ``group``, sent as JSON bytes."""
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    try:
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            dist.broadcast(buf, src=0, group=group)
    except (RuntimeError, dist.DistError) as exc:
        raise timed_out(what, timeout, exc) from exc
    return json.loads(bytes(buf.numpy()).decode()) if dist.get_rank() != 0 else obj


def all_ok(ok: bool, group: Any, what: str, timeout: float) -> bool:
    """True when every rank of ``group`` passes ``ok=True``."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    except (RuntimeError, dist.DistError) as exc:
        raise timed_out(what, timeout, exc) from exc
    return bool(flag.item())


def first_failure(what: str, exc: Any) -> CkptTrackError:
    """The typed error of the first rank that failed inside DCP, naming the rank."""
    for rank, failure in sorted(exc.failures.items()):
        err = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(err, CkptTrackError):
            return type(err)(f"rank {rank}: {err}") if type(err).__init__ is CkptTrackError.__init__ else err
        return DistributedError(f"{what} failed on rank {rank}: {type(err).__name__}: {err}")
    return DistributedError(f"{what} failed: {exc}")


def timed_out(what: str, timeout: float, exc: BaseException) -> DistributedError:
    """The typed error of a collective that failed: a rank hung, died or failed."""
    return DistributedError(
        f"{what} failed: a rank did not take part within {timeout:g} s (collective_timeout) or the process "
        f"group broke ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}). Every rank calls "
        "ct.init, log_checkpoint, resume and finish at the same points; nothing partial was committed")
