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
from typing import Any

import torch
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
    check_name,
    hash_open,
    open_regular,
    read_header,
    read_tensor,
    write_blobs,
)
from .layout import Chunk, chunk_key

__all__ = ["ShardReader", "ShardWriter"]

#: ``commit(metadata, results of every rank, storage_data of every rank's plan)`` on rank 0
Commit = Callable[[Metadata, list[list[WriteResult]], list[Any]], None]


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


class ShardWriter(StorageWriter):
    """Writes this rank's chunks into the shared staging directory ``tmp``."""

    def __init__(self, tmp: Path, reuse: list[LocalCheckpoint], rank_data: Any, commit: Commit | None,
                 pack_size: int) -> None:
        super().__init__()
        self.tmp = Path(tmp)
        self.reuse = reuse
        self.rank_data = rank_data  # JSON this rank hands rank 0 through the plan (its RNG tree)
        self.commit = commit
        self.pack_size = pack_size
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
        self.verified: set[str] = set()

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
        entry = self.manifest.files.get(fname)
        if entry is None:
            raise IntegrityError(f"{self.path}: layout.json names {fname!r}, which the manifest does not list; "
                                 "the checkpoint is damaged")
        try:
            with open_regular(self.path / check_name(fname, self.path)) as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size or hash_open(f, entry.size) != entry.hash:
                    raise IntegrityError(f"{self.path}/{fname}: does not match the manifest (truncated, modified or "
                                         "corrupted); nothing was loaded into the live objects")
                self.verified.add(fname)
                header = {i.name: i for i in read_header(f, fname)}
                chunks: dict[str, torch.Tensor] = {}
                for item in items:
                    chunk = where[item.storage_index]
                    info = header.get(chunk.key)
                    if info is None or info.shape != chunk.sizes or info.dtype is None:
                        raise IntegrityError(f"{self.path}/{fname}: holds no chunk {chunk.key!r} of the layout's "
                                             "shape; the checkpoint is damaged")
                    if chunk.key not in chunks:
                        chunks[chunk.key] = read_tensor(f, fname, info)
                    src = chunks[chunk.key]
                    for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                        src = src.narrow(dim, off, length)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != src.shape or target.dtype != src.dtype:
                        raise IntegrityError(f"{self.path}/{fname}: chunk {chunk.key!r} does not fit its target "
                                             f"({tuple(src.shape)} {src.dtype} vs {tuple(target.shape)} {target.dtype})")
                    target.copy_(src)
                    planner.commit_tensor(item, target)
        except FileNotFoundError as exc:
            raise IntegrityError(f"{self.path}/{fname}: missing; nothing was loaded into the live objects") from exc
        except OSError as exc:
            raise IntegrityError(f"{self.path}/{fname}: cannot be read ({exc})") from exc

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False
