"""The one-pass safetensors writer (ckpt_track.format.serialize)."""

from __future__ import annotations

import errno
import fcntl
import itertools
import os

import pytest
import torch
from safetensors.torch import load_file, save

from ckpt_track.format import hash_file, hashing, load_checkpoint, serialize, write, write_checkpoint
from ckpt_track.format.hashing import content_digest

MIXED = {
    "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "a": torch.tensor([1.5, -2.0], dtype=torch.float16),
    "c": torch.tensor(7, dtype=torch.int64),  # a scalar
    "d": torch.tensor([True, False, True]),
    "e": torch.empty(0, 4, dtype=torch.bfloat16),  # no bytes at all
    "f": torch.arange(5, dtype=torch.uint8),
    "g": torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    "h": torch.tensor([1 + 2j], dtype=torch.complex64),
}


def test_one_pass_gives_the_file_hash(tmp_path):
    prepared = serialize.prepare(MIXED, list(MIXED), metadata={"format": "pt"})
    entry = serialize.write_prepared(tmp_path / "x.safetensors", prepared)
    assert entry.hash == hash_file(tmp_path / "x.safetensors")
    assert entry.size == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(tmp_path / "x.safetensors")  # safetensors' own reader validates the layout
    assert back.keys() == MIXED.keys()
    assert all(torch.equal(back[k], v) for k, v in MIXED.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_a_file_of_one_dtype_is_byte_identical_to_safetensors(tmp_path, dtype):
    tensors = {f"w{i}": torch.arange(i * 3 + 1).to(dtype) for i in range(5)}
    serialize.write_prepared(tmp_path / "x.safetensors", serialize.prepare(tensors, list(tensors),
                                                                         metadata={"format": "pt"}))
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


def test_a_checkpoint_is_written_without_reading_its_files_back(tmp_path, monkeypatch):
    """The manifest's hashes come from the write's own pass: nothing hashes a written file again."""
    def refuse(path):
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(write, "hash_file", refuse)
    monkeypatch.setattr(hashing, "hash_file", refuse)
    tensors = {"big": torch.randn(300_000), **MIXED}
    for blobs in (True, False):
        ckpt = write_checkpoint(tmp_path, f"c-{blobs}", tensors, {"k": 1}, step=1, blobs=blobs)
        monkeypatch.undo()
        _, loaded, _ = load_checkpoint(ckpt.path)  # verifies every hash
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
        monkeypatch.setattr(write, "hash_file", refuse)


def test_writeback_starts_while_a_large_file_is_written(tmp_path, monkeypatch):
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(serialize, "WRITEBACK_EVERY", 1 << 16)
    monkeypatch.setattr(serialize, "_start_writeback", lambda fd, off, n: started.append((off, n)))
    t = {"w": torch.zeros(100_000)}  # 400 kB: about six ranges of 64 KiB
    entry = serialize.write_prepared(tmp_path / "x.safetensors", serialize.prepare(t, ["w"]))
    assert len(started) >= 5
    assert started[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(started))
    assert started[-1][0] + started[-1][1] <= entry.size


def test_sync_file_range_is_harmless_on_this_system(tmp_path):
    t = {"w": torch.arange(70 << 18, dtype=torch.float32)}  # 70 MiB: one writeback range started
    entry = serialize.write_prepared(tmp_path / "x.safetensors", serialize.prepare(t, ["w"]))
    assert entry.hash == hash_file(tmp_path / "x.safetensors")


def test_an_existing_file_is_never_overwritten(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        serialize.write_prepared(tmp_path / "x.safetensors", serialize.prepare(MIXED, list(MIXED)))
    assert (tmp_path / "x.safetensors").read_bytes() == b"keep"


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors whose sizes are not multiples of 4 KiB, one of them at an unaligned address."""
    g = torch.Generator().manual_seed(3)
    unaligned = torch.empty(300_001)[1:]  # contiguous, owns its bytes, starts 4 bytes into an allocation
    unaligned.copy_(torch.randn(300_000, generator=g))
    return {"a": serialize.aligned_empty((700_003,), torch.float32).copy_(torch.randn(700_003, generator=g)),
            "b": unaligned, "c": torch.arange(1001, dtype=torch.int16)}


@pytest.mark.parametrize("names", [["a"], ["b"], ["a", "b", "c"], ["c", "b"]])
def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path, monkeypatch, names):
    tensors = _odd_tensors()
    prepared = serialize.prepare(tensors, names)
    direct = serialize.write_prepared(tmp_path / "direct", prepared)
    monkeypatch.setattr(serialize, "DIRECT", False)
    buffered = serialize.write_prepared(tmp_path / "buffered", prepared)
    assert (tmp_path / "direct").read_bytes() == (tmp_path / "buffered").read_bytes()
    assert direct == buffered and direct.hash == hash_file(tmp_path / "direct")
    back = load_file(tmp_path / "direct")
    assert all(torch.equal(back[k], tensors[k]) for k in names)


def test_an_aligned_staging_buffer_is_written_in_place(tmp_path):
    """The bulk of a large tensor goes from its own memory to the disk: only the header block
    and the last partial block pass through the bounce buffer."""
    t = {"w": serialize.aligned_empty((3, 1 << 20), torch.float32).fill_(1.5)}  # 12 MiB
    prepared = serialize.prepare(t, ["w"])
    assert len(prepared.header) % serialize.ALIGN == 0  # the data starts on a block boundary
    try:
        fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"no direct I/O on this file system ({exc})")
    try:
        writer = serialize._DirectWriter(fd)
        assert writer.write([memoryview(prepared.header), *prepared.parts]) == prepared.size
    finally:
        os.close(fd)
    assert writer.bounced == len(prepared.header)
    assert hash_file(tmp_path / "x") == prepared.file_hash


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    real_open, real_write = os.open, os.write
    refused = {"open": 0, "write": 0}

    def no_direct_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT and refused["open"] == 0:
            refused["open"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    tensors = _odd_tensors()
    prepared = serialize.prepare(tensors, ["a", "b"])
    monkeypatch.setattr(os, "open", no_direct_open)
    serialize.write_prepared(tmp_path / "x", prepared)  # refused at open: written buffered
    assert refused["open"] == 1

    def refuse_first_direct_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and refused["write"] == 0:
            refused["write"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_first_direct_write)
    serialize.write_prepared(tmp_path / "y", prepared)  # refused part way: the rest buffered
    assert refused["write"] == 1
    for name in ("x", "y"):
        assert hash_file(tmp_path / name) == prepared.file_hash


def test_a_tensor_file_is_named_by_its_own_hash_and_never_by_an_older_writers_name(tmp_path):
    """Files written before this writer are named by a content digest of their tensors and hold
    safetensors' own layout; this writer lays the same tensors out differently (padding, order),
    so it must never write other bytes under such a name: a tracker holding the file once per run
    would keep the old bytes under the new manifest's hash."""
    big = {"w": serialize.aligned_empty((300_000,), torch.float32).fill_(0.5)}  # padded header
    for tensors in (MIXED, big):
        ckpt = write_checkpoint(tmp_path, f"c{len(tensors)}", tensors, {}, step=1, blobs=True)
        old_name = f"t-{content_digest(tensors, sorted(tensors))}.safetensors"
        for fname, entry in ckpt.manifest.files.items():
            if fname.startswith("t-"):
                assert fname == f"t-{entry.hash}.safetensors"
                assert fname != old_name
                assert (tmp_path / ckpt.path.name / fname).read_bytes() != save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("shape", [(1024, 1024), (3,), (0, 5)])
def test_a_staging_buffer_owns_exactly_its_bytes(shape):
    """DCP's writers and safetensors write a tensor without cloning only when it owns exactly its
    storage; a large buffer also starts on a block boundary (for direct I/O)."""
    t = serialize.aligned_empty(shape, torch.float32)
    assert t.shape == shape and t.is_contiguous() and t.storage_offset() == 0
    assert t.untyped_storage().nbytes() == t.numel() * 4
    if t.numel() * 4 >= serialize.ALIGN_FILES_FROM:
        assert t.data_ptr() % serialize.ALIGN == 0
