"""``layout.json``: where each tensor's shards lie, the JSON stand-in for DCP's pickled metadata.

A sharded checkpoint (format v2) stores every tensor as the chunks its ranks held: each chunk
is one safetensors entry (``<name>@<offsets>``) in a content-addressed file.  The layout lists,
per tensor name, its dtype, global size and chunks (offsets, sizes, file, entry); from it the
reader builds DCP's ``Metadata`` for resharding without ever unpickling.  A format-v1
checkpoint gets an equivalent layout from its safetensors headers (every tensor one chunk), so
both load through the same reader.  Parsing checks every field: a layout may be hostile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import IntegrityError
from ..format import TensorInfo

__all__ = ["Chunk", "Layout", "TensorLayout", "chunk_key", "from_index", "parse_layout"]

LAYOUT_FORMAT = "ckpt_track-layout"
_MAX_DIM = 2**48


def chunk_key(name: str, offsets: tuple[int, ...]) -> str:
    """The safetensors entry of one chunk of tensor ``name`` (offsets into the whole tensor)."""
    return f"{name}@{','.join(map(str, offsets))}"


def _dtype(name: Any, where: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise IntegrityError(f"{where}: unknown dtype {name!r}; the checkpoint is damaged")
    return value


def _dims(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < _MAX_DIM for d in value):
        raise IntegrityError(f"{where}: {value!r} is not a list of sizes; the checkpoint is damaged")
    return tuple(value)


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    key: str


@dataclass(frozen=True)
class TensorLayout:
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Layout:
    """Every tensor of a checkpoint: name -> dtype, global size and where its chunks lie."""

    world_size: int
    tensors: Mapping[str, TensorLayout]

    def to_json(self) -> dict[str, Any]:
        return {"format": LAYOUT_FORMAT, "world_size": self.world_size, "tensors": {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "size": list(t.size),
                   "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "key": c.key}
                              for c in t.chunks]}
            for name, t in sorted(self.tensors.items())}}

    def metadata(self) -> Metadata:
        """DCP's ``Metadata`` of this layout; ``storage_data`` maps each chunk to its Chunk."""
        sd: dict[str, Any] = {}
        where: dict[MetadataIndex, Chunk] = {}
        for name, t in self.tensors.items():
            sd[name] = TensorStorageMetadata(
                TensorProperties(dtype=t.dtype), torch.Size(t.size),
                [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in t.chunks])
            for c in t.chunks:
                where[MetadataIndex(name, c.offsets)] = c
        return Metadata(state_dict_metadata=sd, storage_data=where)


def parse_layout(data: Any, where: str = "layout.json") -> Layout:
    """A layout from parsed JSON, every field checked: chunks inside their tensor, of its rank,
    and together covering it exactly once (by element count)."""
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
        raise IntegrityError(f"{where}: not a ckpt_track layout; the checkpoint is damaged")
    world = data.get("world_size")
    tensors = data.get("tensors")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not isinstance(tensors, dict):
        raise IntegrityError(f"{where}: malformed world_size or tensors; the checkpoint is damaged")
    return Layout(world, {str(n): _tensor(n, t, f"{where}: tensor {n!r}") for n, t in tensors.items()})


def _tensor(name: str, t: Any, where: str) -> TensorLayout:
    if not isinstance(t, dict) or not isinstance(t.get("chunks"), list):
        raise IntegrityError(f"{where}: malformed entry; the checkpoint is damaged")
    size = _dims(t.get("size"), where)
    chunks = []
    for c in t["chunks"]:
        if not isinstance(c, dict) or not isinstance(c.get("file"), str) or not isinstance(c.get("key"), str):
            raise IntegrityError(f"{where}: malformed chunk; the checkpoint is damaged")
        off, sz = _dims(c.get("offsets"), where), _dims(c.get("sizes"), where)
        if len(off) != len(size) or len(sz) != len(size) or any(o + s > d for o, s, d in zip(off, sz, size)):
            raise IntegrityError(f"{where}: a chunk lies outside the tensor's size {list(size)}; "
                                 "the checkpoint is damaged")
        chunks.append(Chunk(off, sz, c["file"], c["key"]))
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
        raise IntegrityError(f"{where}: its chunks do not cover the tensor exactly once; the checkpoint is damaged")
    return TensorLayout(_dtype(t.get("dtype"), where), size, tuple(chunks))


def from_index(index: Mapping[str, TensorInfo]) -> Layout:
    """The layout of a format-v1 checkpoint: every tensor whole, one chunk at offset 0."""
    tensors = {}
    for name, info in index.items():
        if info.dtype is None:
            raise IntegrityError(f"{info.file}: tensor {name!r} has a dtype this reader cannot reshard")
        zero = (0,) * len(info.shape)
        tensors[name] = TensorLayout(info.dtype, info.shape, (Chunk(zero, info.shape, info.file, name),))
    return Layout(1, tensors)
