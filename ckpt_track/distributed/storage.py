"""ckpt_track's ``StorageWriter`` and ``StorageReader`` for torch.distributed.checkpoint.

DCP plans the save (every rank writes the chunks it holds; a tensor replicated on several
ranks is written by one) and the load (any world size, resharding).  These two classes put
the bytes into ckpt_track's format: every rank writes its chunks into content-addressed
safetensors files in the version's staging directory, linking a file the previous version
already holds (incremental per shard); rank 0 commits (``finish``) with the layout in JSON.
Reading builds DCP's metadata from that JSON and verifies each file's hash, from the open
file, before reading a byte of it.  Nothing is pickled or unpickled by either class; a
non-tensor value reaching them is refused (ckpt_track keeps those in ``state.json``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..errors import DistributedError, IntegrityError, SerializationError
from ..format import (
    FileEntry,
    LocalCheckpoint,
    Manifest,
    TensorInfo,
    check_name,
    fits,
    open_regular,
    read_header,
    write_blobs,
)
from ..format.files import CHUNK
from ..format.hashing import tensor_bytes
from .layout import Chunk, chunk_key

__all__ = ["ShardReader", "ShardWriter"]

#: ``commit(metadata, results of every rank, storage_data of every rank's plan)`` on rank 0
Commit = Callable[[Metadata, list[list[WriteResult]], list[Any]], None]


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


class ShardWriter(StorageWriter):
    """Writes this rank's chunks into the shared staging directory ``tmp``; with ``remote`` (an
    object store, ``[storage] url``) into this rank's own ``tmp``, each file then sent to the
    bucket, so the ranks share no filesystem."""

    def __init__(self, tmp: Path, reuse: list[LocalCheckpoint], rank_data: Any, commit: Commit | None,
                 pack_size: int, remote: Any = None) -> None:
        super().__init__()
        self.tmp = Path(tmp)
        self.reuse = reuse
        self.rank_data = rank_data  # JSON this rank hands rank 0 through the plan (its RNG tree)
        self.commit = commit
        self.pack_size = pack_size
        self.remote = remote
        self._plans_data: list[Any] = []

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self.tmp.is_dir():
            raise DistributedError(
                f"this rank cannot see rank 0's staging directory {self.tmp}: every rank writes into one "
                "version, so [local] root (the spool) must be on a filesystem all ranks share (one node, or NFS/"
                "Lustre across nodes)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=self.rank_data)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._plans_data = [p.storage_data for p in plans]
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        tensors: dict[str, torch.Tensor] = {}
        items = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise SerializationError(f"{item.index.fqn}: a non-tensor value reached the tensor writer")
            t = planner.resolve_data(item)
            if not isinstance(t, torch.Tensor):
                raise SerializationError(f"{item.index.fqn}: not a tensor")
            t = t.detach().to("cpu")
            t = t.contiguous() if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes else t.clone()
            key = chunk_key(item.index.fqn, tuple(item.index.offset or ()))
            tensors[key] = t
            items.append((item, key))
        files, placed = write_blobs(self.tmp, tensors, reuse=self.reuse, pack_size=self.pack_size)
        if self.remote is not None:
            self.remote.upload({self.remote.object_path(e): self.tmp / f for f, e in files.items()},
                               f"the shards of rank {self.rank_data.get('rank')}")
        return _done([WriteResult(index=item.index, size_in_bytes=tensors[key].nbytes,
                                  storage_data={"file": placed[key], "key": key, "size": files[placed[key]].size,
                                                "hash": files[placed[key]].hash})
                      for item, key in items])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.commit is not None:
            self.commit(metadata, results, self._plans_data)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def files_of(results: list[list[WriteResult]]) -> tuple[dict[str, FileEntry], dict[MetadataIndex, Chunk]]:
    """Every rank's files and where each chunk went, from the write results rank 0 gathered."""
    files: dict[str, FileEntry] = {}
    where: dict[MetadataIndex, tuple[str, str]] = {}
    for rank_results in results:
        for r in rank_results:
            sd = r.storage_data
            files[sd["file"]] = FileEntry(int(sd["size"]), str(sd["hash"]))
            where[r.index] = (sd["file"], sd["key"])
    return files, where  # type: ignore[return-value]


class ShardReader(StorageReader):
    """Reads chunks out of a verified checkpoint directory for DCP's load planner."""

    def __init__(self, path: Path, manifest: Manifest, metadata: Metadata) -> None:
        super().__init__()
        self.path = Path(path)
        self.manifest = manifest
        self._metadata = metadata
        self._buf: memoryview | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        where: Mapping[MetadataIndex, Chunk] = self._metadata.storage_data
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(where[item.storage_index].file, []).append(item)
        for fname, items in sorted(by_file.items()):
            self._read_file(fname, items, where, planner)
        return _done(None)

    def _read_file(self, fname: str, items: list[Any], where: Mapping[MetadataIndex, Chunk],
                   planner: LoadPlanner) -> None:
        """One pass over the file: every byte is read once, into the target when a chunk fills
        one whole (else into fresh memory, then copied), and hashed on the way; a file whose
        hash differs from the manifest's raises before DCP returns (the targets are fresh
        memory, never the live objects: nothing is applied until every file matched)."""
        entry = self.manifest.files.get(fname)
        if entry is None:
            raise IntegrityError(f"{self.path}: layout.json names {fname!r}, which the manifest does not list; "
                                 "the checkpoint is damaged")
        try:
            with open_regular(self.path / check_name(fname, self.path)) as f:
                if os.fstat(f.fileno()).st_size != entry.size:
                    raise IntegrityError(f"{self.path}/{fname}: size differs from the manifest (truncated or "
                                         "modified); nothing was loaded into the live objects")
                infos = read_header(f, fname)
                wanted = self._wanted(fname, infos, items, where)
                h = _Hashing(f, self._scratch())
                for info in sorted(infos, key=lambda i: i.start):
                    h.skip_to(info.start)
                    if info.name in wanted:
                        self._fill(h, info, wanted[info.name], planner)
                h.skip_to(entry.size)
                if h.hexdigest() != entry.hash:
                    raise IntegrityError(f"{self.path}/{fname}: content hash does not match the manifest (modified "
                                         "or corrupted); nothing was loaded into the live objects")
        except FileNotFoundError as exc:
            raise IntegrityError(f"{self.path}/{fname}: missing; nothing was loaded into the live objects") from exc
        except OSError as exc:
            raise IntegrityError(f"{self.path}/{fname}: cannot be read ({exc})") from exc

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def _scratch(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(CHUNK))
        return self._buf

    def _wanted(self, fname: str, infos: list[TensorInfo], items: list[Any],
                where: Mapping[MetadataIndex, Chunk]) -> dict[str, list[Any]]:
        """The read items of this file by safetensors entry, each entry checked against the layout."""
        header = {i.name: i for i in infos}
        wanted: dict[str, list[Any]] = {}
        for item in items:
            chunk = where[item.storage_index]
            info = header.get(chunk.key)
            if info is None or info.shape != chunk.sizes or info.dtype is None:
                raise IntegrityError(f"{self.path}/{fname}: holds no chunk {chunk.key!r} of the layout's shape; "
                                     "the checkpoint is damaged")
            wanted.setdefault(chunk.key, []).append(item)
        return wanted

    def _fill(self, h: _Hashing, info: TensorInfo, items: list[Any], planner: LoadPlanner) -> None:
        """Read one stored chunk into the targets of ``items`` (hashed on the way)."""
        whole = len(items) == 1 and not any(items[0].storage_offsets) and tuple(items[0].lengths) == info.shape
        target = planner.resolve_tensor(items[0]).detach() if whole else None
        direct = target is not None and fits(target, info)
        buf = target if direct else torch.empty(info.shape, dtype=info.dtype)
        h.read_into(tensor_bytes(buf), info)
        for item in items:
            dest = target if target is not None else planner.resolve_tensor(item).detach()
            if not direct:
                src = buf
                for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                    src = src.narrow(dim, off, length)
                if dest.shape != src.shape or dest.dtype != src.dtype:
                    raise IntegrityError(f"{self.path}/{info.file}: chunk {info.name!r} does not fit its target "
                                         f"({tuple(src.shape)} {src.dtype} vs {tuple(dest.shape)} {dest.dtype})")
                dest.copy_(src)
            planner.commit_tensor(item, dest)


class _Hashing:
    """Sequential reads of an open file that hash every byte on the way (xxh3-128, the
    manifest's algorithm): the verification costs no second pass over the data."""

    def __init__(self, f: BinaryIO, scratch: memoryview) -> None:
        self.f = f
        self.h = xxhash.xxh3_128()
        self.pos = 0
        self.scratch = scratch
        f.seek(0)

    def skip_to(self, end: int) -> None:
        """Hash the bytes up to ``end`` (a header, padding, entries no target needs)."""
        while self.pos < end:
            n = self.f.readinto(self.scratch[:min(len(self.scratch), end - self.pos)])
            if not n:
                raise OSError(f"the file ended at byte {self.pos} (truncated)")
            self.h.update(self.scratch[:n])
            self.pos += n

    def read_into(self, view: memoryview, info: TensorInfo) -> None:
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise OSError(f"{info.file} ended inside tensor {info.name!r} (truncated)")
            got += n
        self.h.update(view)
        self.pos += got

    def hexdigest(self) -> str:
        return self.h.hexdigest()
