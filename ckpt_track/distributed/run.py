"""A run under torch.distributed: ``init``, ``log_checkpoint``, ``resume`` called by every rank.

Rank 0 holds an ordinary :class:`ckpt_track.run.Run` (the tracker run, the spool, the upload
thread); every rank has a :class:`DistributedRun` around it.  A save runs on each rank's
writer thread: rank 0 opens the version's staging directory in the spool and tells the
others (JSON over the dedicated gloo group), DCP writes every rank's chunks into it through
:class:`~ckpt_track.distributed.storage.ShardWriter`, rank 0 commits once every rank has
written and queues the one version for upload.  A resume is decided by rank 0 (the exact
version, so every rank starts from the same step) and loaded by every rank through DCP at
its own world size.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from .. import errors
from ..checkpointing import CheckpointHandle, check_step, metric_values, user_aliases, warn_step_order
from ..errors import CheckpointNotFound, CheckpointWriteError, CkptTrackError, DistributedError, SerializationError
from ..external import from_pointer, is_record, pointer_of, seal, storage_url
from ..format import (
    LAYOUT,
    PACK_SIZE,
    SHARDED_FORMAT_VERSION,
    LocalCheckpoint,
    Manifest,
    commit_staged,
    free_space,
    now_iso,
    read_manifest,
    staging,
)
from ..records import RunInfo, Stored
from ..refs import Ref
from ..replicas import open_store
from ..resolve import list_stored
from ..writer import Writer, wait_staged
from .capture import ShardedState, capture_sharded, stage
from .comm import Comm, all_ok, broadcast_json, first_failure, timed_out
from .layout import Chunk, Layout, TensorLayout
from .restore import restore_dir
from .storage import ShardWriter, files_of

if TYPE_CHECKING:
    from typing_extensions import Self

    from ..run import Run

__all__ = ["DistributedRun", "identity_of"]

log = logging.getLogger("ckpt_track")


def identity_of(run: Run) -> dict[str, Any]:
    """What rank 0 tells the other ranks about the run it opened."""
    i = run.info
    return {"ref": str(i.ref), "backend": i.backend, "project": i.project, "run_id": i.run_id, "name": i.name,
            "resumed": i.resumed}


@dataclass
class _Part:
    """What a save returns on a rank other than 0: its part is written; rank 0 stores the version."""

    first: Future[Stored | None] = field(default_factory=Future)

    def __post_init__(self) -> None:
        self.first.set_result(None)


class DistributedRun:
    """One rank's view of a collective run; create with ``ct.init`` under a process group."""

    def __init__(self, comm: Comm, leader: Run | None, identity: Mapping[str, Any], settings: Any) -> None:
        self.comm = comm
        self.settings = settings
        self._leader = leader
        self._ref = Ref.parse(str(identity["ref"]))
        self._info = leader.info if leader is not None else RunInfo(
            backend=str(identity["backend"]), project=str(identity["project"]), run_id=str(identity["run_id"]),
            name=str(identity["name"]), ref=self._ref, resumed=bool(identity["resumed"]))
        self._writer = leader._writer if leader is not None else Writer(settings.max_in_flight)
        self._finished = False
        if leader is None:
            atexit.register(self._writer.close)

    # -- identity -------------------------------------------------------------------------
    @property
    def info(self) -> RunInfo:
        return self._info

    @property
    def ref(self) -> Ref:
        return self._ref

    @property
    def id(self) -> str:
        return self._info.run_id

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def project(self) -> str:
        return self._info.project

    @property
    def resumed(self) -> bool:
        return self._info.resumed

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world

    def __repr__(self) -> str:
        return f"<DistributedRun {self.ref} rank {self.rank}/{self.world_size}>"

    # -- saving -----------------------------------------------------------------------------
    def log_checkpoint(self, step: int, *, model: torch.nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                       metrics: Mapping[str, Any] | None = None, aliases: Iterable[str] = (),
                       extra: Mapping[str, Any] | None = None, epoch: int | None = None,
                       blocking: bool | None = None, overlap: bool | None = None) -> CheckpointHandle:
        """Collective: every rank calls it with its own objects at the same step.  Returns once
        this rank's state is copied; the sharded write, the commit on rank 0 and the upload run
        in the background.  ``wait()`` on rank 0 returns the stored version; on other ranks
        None once this rank's part is written.  ``overlap`` is accepted for the single-process
        signature's sake: under torch.distributed every tensor is copied before this returns."""
        if self._finished:
            raise CheckpointWriteError("this run is finished; start a new one with ct.init()")
        step = check_step(step)
        chosen = user_aliases(aliases)
        values = metric_values(metrics)
        if self._leader is not None:  # rank 0 warns once for the collective
            self._leader._last_step = warn_step_order(self.ref, step, self._leader._last_step)
        blocking = self.settings.blocking if blocking is None else blocking
        self._writer.raise_errors()
        state = capture_sharded(rank=self.rank, step=step, epoch=epoch, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, extra=extra)
        ref = self.ref.select(step=step)
        leader = self._leader

        def staged_job(buffers: dict[str, torch.Tensor]) -> tuple[Any, Any, Any]:
            tensors, event = stage(state.tensors, buffers)
            return tensors, event, leader._chain.next(ref) if leader is not None else None

        def job(arg: tuple[Any, Any, Any]) -> Any:
            tensors, event, lineage = arg
            wait_staged(event)
            return self._save(step, epoch, values, state, tensors, lineage, chosen)

        if blocking:
            self._writer.flush()
            done: Future[Any] = Future()
            done.set_result(job(staged_job({})))
            handle = CheckpointHandle(step, ref, done)
            handle.wait()
            return handle
        return CheckpointHandle(step, ref, self._writer.submit_staged(staged_job, job), self._writer)

    def _save(self, step: int, epoch: int | None, metrics: dict[str, float], state: ShardedState,
              tensors: dict[str, torch.Tensor], lineage: Any, aliases: tuple[str, ...]) -> Any:
        """One collective save (writer thread of every rank, in the same order everywhere)."""
        what = f"the save of step {step}"
        bucket = storage_url(self.settings)
        remote = open_store(self.settings, bucket) if bucket is not None else None
        if self._leader is None:
            msg = broadcast_json(None, self.comm.save_group, what, self.comm.timeout)
            if not msg.get("ok"):
                raise CheckpointWriteError(f"checkpoint at step {step} was not saved: rank 0: {msg.get('error')}")
            rank_data = {"rank": self.rank, "rng": state.rng}
            if remote is None:
                reuse = _readable([Path(p) for p in msg["reuse"]])
                self._dcp_save(what, tensors, ShardWriter(Path(msg["tmp"]), reuse, rank_data, None, PACK_SIZE))
                return _Part()
            with tempfile.TemporaryDirectory(prefix="ckpt-track-shards-") as own:  # no shared filesystem needed
                self._dcp_save(what, tensors, ShardWriter(Path(own), [], rank_data, None, PACK_SIZE, remote))
            return _Part()
        run = self._leader
        spool = run._spool
        committed: list[LocalCheckpoint] = []
        with ExitStack() as stack:
            try:
                stack.enter_context(spool.reusing())
                tmp, final = stack.enter_context(staging(spool.root, spool.new_name(step)))
                reuse = spool.reusable()
            except BaseException as exc:
                broadcast_json({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, self.comm.save_group, what,
                               self.comm.timeout)
                raise CheckpointWriteError(f"could not start checkpoint at step {step} in {spool.root} "
                                           f"({free_space(spool.root)}): {exc}") from exc
            broadcast_json({"ok": True, "tmp": str(tmp), "reuse": [str(c.path) for c in reuse]},
                           self.comm.save_group, what, self.comm.timeout)
            if remote is not None:
                reuse = [c for c in reuse if not is_record(c)]
            manifest = Manifest(step=step, files={}, epoch=epoch, created=now_iso(), metrics=metrics,
                                lineage=dict(lineage or {}), format_version=SHARDED_FORMAT_VERSION,
                                world_size=self.world_size)
            commit = _committer(tmp, final, state, manifest, self.world_size, committed)
            self._dcp_save(what, tensors, ShardWriter(tmp, reuse, {"rank": 0, "rng": state.rng}, commit, PACK_SIZE,
                                                      remote))
            if remote is not None:  # the other ranks' shards are in the bucket: the spool keeps a record
                committed[0] = self._seal(committed[0], bucket, spool, step, stack)
        backends = [b.name for b, _ in run._targets]
        try:
            item = spool.add(committed[0], aliases, backends)
        except OSError as exc:  # committed; upload it from memory (a crash now: the next start queues it)
            log.warning("ckpt_track: could not write the upload record of %s (%s); uploading it anyway",
                        committed[0].path, exc)
            item = spool.add_unrecorded(committed[0], aliases, backends)
        run._uploader.kick()
        return item

    def _seal(self, ckpt: LocalCheckpoint, bucket: str, spool: Any, step: int, stack: ExitStack) -> LocalCheckpoint:
        """Rank 0, ``[storage] url``: the committed version holds rank 0's files only; send them
        too, check every rank's are in the bucket, and keep the record in the spool instead."""
        try:
            rtmp, rfinal = stack.enter_context(staging(spool.root, spool.new_name(step)))
            return seal(ckpt, self.settings, bucket, rtmp, rfinal)
        finally:
            shutil.rmtree(ckpt.path, ignore_errors=True)

    def _dcp_save(self, what: str, tensors: dict[str, torch.Tensor], writer: ShardWriter) -> None:
        try:
            dcp_save(tensors, storage_writer=writer, process_group=self.comm.save_group)
        except CheckpointException as exc:
            raise first_failure(what, exc) from exc
        except CkptTrackError:
            raise
        except (RuntimeError, torch.distributed.DistError) as exc:
            raise timed_out(what, self.comm.timeout, exc) from exc

    # -- resuming ----------------------------------------------------------------------------
    def resume(self, *, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
               scheduler: Any = None, scaler: Any = None, ref: str | Ref | None = None, strict: bool = True,
               rng: bool = True) -> int:
        """Collective: restore this run's newest checkpoint (or ``ref``) on every rank, at this
        world size (resharded when it differs from the writer's).  Rank 0 picks the exact
        version, so every rank continues from the same step.  Returns that step + 1, or 0."""
        self._writer.flush()
        what = "resume"
        group, timeout = self.comm.control_group, self.comm.timeout
        with ExitStack() as hold:
            source = None
            if self._leader is not None:
                try:
                    source = self._leader._resume_source(ref)
                    msg = self._describe(source, hold)
                except Exception as exc:  # every rank raises it, instead of waiting out the timeout
                    broadcast_json({"ok": False, "error": str(exc), "type": type(exc).__name__}, group, what, timeout)
                    raise
                broadcast_json(msg, group, what, timeout)
            else:
                msg = broadcast_json(None, group, what, timeout)
                if not msg.get("ok"):
                    raise _typed(msg)
            if msg.get("none"):
                return 0

            def agree(err: BaseException | None) -> None:
                if not all_ok(err is None, group, what, timeout) and err is None:
                    raise DistributedError("another rank could not load the checkpoint (its error is in its log); "
                                           "nothing was changed on this rank")

            path = Path(msg["path"])
            if "pointer" in msg and self._leader is None:  # [storage] url: this rank fetches from the bucket itself
                try:
                    path = from_pointer(msg["pointer"], self.settings).path
                except CkptTrackError as exc:
                    agree(exc)
                    raise
            try:
                restored = restore_dir(path, rank=self.rank, model=model, optimizer=optimizer,
                                       scheduler=scheduler, scaler=scaler, strict=strict, rng=rng, agree=agree)
            except CheckpointNotFound as exc:
                raise DistributedError(
                    f"this rank cannot read rank 0's copy of the checkpoint at {msg['path']} ({exc}): every rank "
                    "reads it there, so the spool ([local] root) and the download cache ($XDG_CACHE_HOME) must be "
                    "on a filesystem all ranks share") from exc
        if self._leader is not None and source is not None:
            self._leader._resumed(source)
        return restored.step + 1

    def _describe(self, source: Any, hold: ExitStack) -> dict[str, Any]:
        if source is None:
            return {"ok": True, "none": True}
        from ..delivery import Spooled

        if isinstance(source, Spooled) and self._leader is not None:  # keep it on disk while it is read
            hold.enter_context(self._leader._spool.reusing())
        ckpt = source.record() if hasattr(source, "record") else source.fetch()
        if is_record(ckpt):  # its files are in the bucket, where every rank fetches them (no shared filesystem)
            data = pointer_of(ckpt)
            pointer = {"manifest": data["manifest"], "url": data["url"]}
            ckpt = from_pointer(pointer, self.settings)
            return {"ok": True, "path": str(Path(ckpt.path).resolve()), "step": ckpt.step, "pointer": pointer}
        return {"ok": True, "path": str(Path(ckpt.path).resolve()), "step": ckpt.step}

    # -- the rest of the Run API --------------------------------------------------------------
    def checkpoints(self) -> list[Stored]:
        return self._leader.checkpoints() if self._leader is not None else list_stored(self.ref, self.settings)

    @property
    def uploads_pending(self) -> int:
        return self._leader.uploads_pending if self._leader is not None else 0

    def wait(self) -> None:
        self._writer.flush()
        if self._leader is not None:
            self._leader.wait()

    def finish(self) -> None:
        """Wait for this rank's pending saves (each is collective, so every rank's); then rank 0
        uploads what is owed and closes the run."""
        if self._finished:
            return
        self._finished = True
        from .. import run as run_module

        if run_module._active is self:
            run_module._active = None
        if self._leader is not None:
            self._leader.finish()
        else:
            atexit.unregister(self._writer.close)
            self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.finish()
        else:
            try:
                self.finish()
            except CkptTrackError as exc:
                log.error("ckpt_track: %s", exc)


def _readable(paths: list[Path]) -> list[LocalCheckpoint]:
    out = []
    for p in paths:
        try:
            out.append(LocalCheckpoint(p, read_manifest(p)))
        except (CkptTrackError, OSError):
            continue  # dropped meanwhile: its files are written afresh
    return out


def _committer(tmp: Path, final: Path, state: ShardedState, manifest: Manifest, world: int,
               out: list[LocalCheckpoint]) -> Callable[[Metadata, list[list[Any]], list[Any]], None]:
    """Rank 0's commit, run by DCP once every rank has written: the layout, ``state.json``
    (with every rank's RNG), the manifest, published."""

    def commit(metadata: Metadata, results: list[list[Any]], plans_data: list[Any]) -> None:
        files, where = files_of(results)
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise SerializationError(f"{fqn}: a non-tensor value reached the sharded writer")
            tensors[fqn] = TensorLayout(md.properties.dtype, tuple(md.size), tuple(
                Chunk(tuple(c.offsets), tuple(c.sizes), *where[MetadataIndex(fqn, c.offsets)]) for c in md.chunks))
        tree = dict(state.tree)
        rngs = {f"rank{d['rank']}": d["rng"] for d in plans_data if isinstance(d, dict) and d.get("rng") is not None}
        if rngs:
            tree["rng"] = rngs
        try:
            out.append(commit_staged(tmp, final, files, tree, {LAYOUT: Layout(world, tensors).to_json()}, manifest))
        except OSError as exc:
            raise CheckpointWriteError(f"could not commit checkpoint at step {manifest.step} to {final.parent} "
                                       f"({free_space(final.parent)}): {exc}; earlier checkpoints are intact") from exc

    return commit


def _typed(msg: Mapping[str, Any]) -> CkptTrackError:
    """Rank 0's error, raised on this rank with the same type."""
    cls = getattr(errors, str(msg.get("type")), None)
    text = f"rank 0: {msg.get('error')}"
    if isinstance(cls, type) and issubclass(cls, CkptTrackError):
        try:
            return cls(text)
        except TypeError:
            pass
    return DistributedError(text)
