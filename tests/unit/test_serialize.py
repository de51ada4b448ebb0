"""The one-pass safetensors writer (ckpt_track.format.serialize)."""

from __future__ import annotations

import itertools

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


def test_one_pass_gives_the_content_digest_and_the_file_hash(tmp_path):
    prepared = serialize.prepare(MIXED, list(MIXED), metadata={"format": "pt"})
    assert prepared.content == content_digest(MIXED, sorted(MIXED))
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
