"""Checkpoint format v1 on disk: layout, sharding, atomic publish, verification, copies."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from helpers import overwrite
from safetensors import safe_open

import ckpt_track.format as fmt
import ckpt_track.format.files as fmt_files
import ckpt_track.format.hashing as fmt_hashing
import ckpt_track.format.write as fmt_write
from ckpt_track.errors import CheckpointNotFound, IntegrityError
from ckpt_track.format import (
    FORMAT_VERSION,
    MANIFEST,
    MAX_FORMAT_VERSION,
    STATE,
    LocalCheckpoint,
    copy_checkpoint,
    hash_file,
    load_checkpoint,
    read_manifest,
    verify,
    write_checkpoint,
)

STATE_TREE: dict[str, Any] = {"step": 5, "epoch": 2, "model": {"w": {"__ct__": "tensor", "name": "model/w"}},
                              "extra": {"nan": float("nan"), "text": "ünïcode"}}


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model/w": torch.randn(4, 5, generator=g),
        "model/b": torch.randn(5, generator=g).to(torch.bfloat16),
        "model/steps": torch.tensor(3, dtype=torch.int64),
        "extra/mask": torch.tensor([True, False, True]),
    }


def write(parent: Path, name: str = "ckpt", tensors: dict[str, torch.Tensor] | None = None, **kw: Any) -> LocalCheckpoint:
    kw.setdefault("step", 5)
    return write_checkpoint(parent, name, some_tensors() if tensors is None else tensors, STATE_TREE, **kw)


def entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def rewrite_manifest(ckpt: Path, change: Any) -> None:
    data = json.loads((ckpt / MANIFEST).read_text())
    data.pop("manifest_hash")  # a hand-edited manifest: only a legacy one (no digest) can be
    change(data)
    overwrite(ckpt / MANIFEST, json.dumps(data).encode())


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    overwrite(path, bytes(data))


def shard_names(ckpt: LocalCheckpoint) -> list[str]:
    return sorted(f for f in ckpt.manifest.files if f.endswith(".safetensors"))


# -- write / read / verify ---------------------------------------------------------
def test_write_read_verify(tmp_path: Path) -> None:
    tensors = some_tensors()
    ckpt = write(tmp_path, epoch=2, metrics={"val/loss": 0.25, "acc": 1}, lineage={"parent": "run-1/v3"})

    assert ckpt.path == tmp_path / "ckpt" and ckpt.step == 5
    assert entries(tmp_path) == ["ckpt"]
    assert entries(ckpt.path) == sorted([MANIFEST, STATE, "tensors-00001-of-00001.safetensors"])

    manifest = read_manifest(ckpt.path)
    assert manifest == ckpt.manifest
    assert manifest.step == 5 and manifest.epoch == 2
    assert manifest.metrics == {"val/loss": 0.25, "acc": 1.0}
    assert manifest.lineage == {"parent": "run-1/v3"}
    assert manifest.format_version == FORMAT_VERSION == 1
    assert manifest.hash_algorithm == "xxh3-128"
    assert manifest.created  # ISO timestamp
    assert set(manifest.files) == {STATE, "tensors-00001-of-00001.safetensors"}  # never itself
    for fname, entry in manifest.files.items():
        assert entry.size == (ckpt.path / fname).stat().st_size
        assert entry.hash == hash_file(ckpt.path / fname)
    assert ckpt.size == manifest.size == sum(e.size for e in manifest.files.values())

    raw = json.loads((ckpt.path / MANIFEST).read_text())
    assert raw["format"] == "ckpt_track" and raw["format_version"] == 1

    assert verify(ckpt.path) == manifest
    loaded_manifest, loaded, state = load_checkpoint(ckpt.path)
    assert loaded_manifest == manifest
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert state["extra"]["text"] == "ünïcode" and state["extra"]["nan"] != state["extra"]["nan"]
    assert {k: v for k, v in state.items() if k != "extra"} == {k: v for k, v in STATE_TREE.items() if k != "extra"}


def test_state_json_is_plain_json_and_hashed(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    data = (ckpt.path / STATE).read_bytes()
    assert ckpt.manifest.files[STATE].hash == xxhash.xxh3_128(data).hexdigest()
    assert json.loads(data)["step"] == 5


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    ckpt = write(tmp_path, tensors={})
    assert set(ckpt.manifest.files) == {STATE}
    _, tensors, state = load_checkpoint(ckpt.path)
    assert tensors == {} and state["step"] == 5


def test_hash_file_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "blob"
    data = bytes(range(256)) * 41 + b"tail"
    p.write_bytes(data)
    whole = xxhash.xxh3_128(data).hexdigest()
    assert hash_file(p) == whole
    monkeypatch.setattr(fmt_files, "CHUNK", 7)  # the chunked reader
    monkeypatch.setattr(fmt_hashing, "CHUNK", 7)  # and the memory-map threshold
    assert hash_file(p) == whole
    p.write_bytes(b"")
    assert hash_file(p) == xxhash.xxh3_128(b"").hexdigest()


# -- sharding ------------------------------------------------------------------------
def test_sharding_above_shard_size(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(5)}  # 1000 bytes each
    tensors["big"] = torch.arange(1000, dtype=torch.float32)  # 4000 bytes: a shard of its own
    ckpt = write(tmp_path, tensors=tensors, shard_size=2500)

    shards = shard_names(ckpt)
    n = len(shards)
    assert n >= 3
    assert shards == [f"tensors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    seen: list[str] = []
    for fname in shards:
        with safe_open(str(ckpt.path / fname), framework="pt") as f:
            keys = list(f.keys())
            assert keys
            nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
            assert nbytes <= 2500 or keys == ["big"]
            seen.extend(keys)
    assert sorted(seen) == sorted(tensors)  # every tensor exactly once

    _, loaded, _ = load_checkpoint(ckpt.path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


def test_one_shard_by_default(tmp_path: Path) -> None:
    ckpt = write(tmp_path, tensors={f"t{i}": torch.ones(1000) for i in range(10)})
    assert shard_names(ckpt) == ["tensors-00001-of-00001.safetensors"]


# -- atomic publish ---------------------------------------------------------------------
def test_manifest_is_written_last_into_a_hidden_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_save, real_write, real_publish = fmt_write.write_prepared, fmt_write._write_bytes, fmt_write.publish

    def write_prepared(path: Path, prepared: Any, **kw: Any) -> Any:
        assert path.parent.name.startswith(fmt.TMP_PREFIX)
        assert not (tmp_path / "ckpt").exists()
        events.append(("save", path.name))
        return real_save(path, prepared, **kw)

    def write_bytes(path: Path, data: bytes) -> None:
        assert path.parent.name.startswith(fmt.TMP_PREFIX)
        assert not (tmp_path / "ckpt").exists()
        if path.name == MANIFEST:  # everything the manifest describes is already there
            for fname in json.loads(data)["files"]:
                assert (path.parent / fname).is_file(), fname
        events.append(("write", path.name))
        real_write(path, data)

    def publish(tmp: Path, final: Path) -> None:
        assert not final.exists()
        events.append(("publish", final.name))
        real_publish(tmp, final)

    monkeypatch.setattr(fmt_write, "write_prepared", write_prepared)
    monkeypatch.setattr(fmt_write, "_write_bytes", write_bytes)
    monkeypatch.setattr(fmt_write, "publish", publish)
    ckpt = write(tmp_path, shard_size=50)
    assert [e for e in events if e[0] == "write"][-1] == ("write", MANIFEST)
    assert events[-2:] == [("write", MANIFEST), ("publish", "ckpt")]
    assert sum(1 for e in events if e[0] == "save") == len(shard_names(ckpt)) >= 2
    assert entries(tmp_path) == ["ckpt"]
    verify(ckpt.path)


def _assert_nothing_left(parent: Path) -> None:
    assert not (parent / "ckpt").exists()
    assert [p for p in entries(parent) if p.startswith(fmt.TMP_PREFIX)] == []


def test_failure_after_first_shard_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = fmt_write.write_prepared
    calls: list[Path] = []

    def write_prepared(path: Path, prepared: Any, **kw: Any) -> Any:
        if calls:
            raise OSError("disk full")
        calls.append(path)
        return real_save(path, prepared, **kw)

    monkeypatch.setattr(fmt_write, "write_prepared", write_prepared)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, shard_size=50)
    assert len(calls) == 1 and not Path(calls[0]).exists()
    _assert_nothing_left(tmp_path)
    monkeypatch.undo()
    write(tmp_path)  # the name is free again
    verify(tmp_path / "ckpt")


@pytest.mark.parametrize("bad", ["non_contiguous", "shared_memory"])
def test_tensor_rejected_by_safetensors_leaves_nothing(tmp_path: Path, bad: str) -> None:
    base = torch.randn(4, 6)
    tensors = {"a": torch.ones(3), "z": base.t()} if bad == "non_contiguous" else {"a": base, "b": base[1]}
    with pytest.raises((ValueError, RuntimeError)):
        write(tmp_path, tensors=tensors)
    _assert_nothing_left(tmp_path)


def test_unserializable_state_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path, "ckpt", some_tensors(), {"x": object()}, step=1)
    _assert_nothing_left(tmp_path)


def test_interrupt_while_writing_manifest_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = fmt_write._write_bytes

    def write_bytes(path: Path, data: bytes) -> None:
        if path.name == MANIFEST:
            real_write(path, data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(fmt_write, "_write_bytes", write_bytes)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path)
    _assert_nothing_left(tmp_path)


def test_existing_target_is_never_clobbered(tmp_path: Path) -> None:
    first = write(tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    with pytest.raises(FileExistsError):
        write(tmp_path, step=2)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    assert entries(tmp_path) == ["ckpt"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        write(tmp_path, "empty")
    assert entries(tmp_path / "empty") == []


# -- verification -------------------------------------------------------------------
def _tensor_file(ckpt: LocalCheckpoint) -> Path:
    return ckpt.path / shard_names(ckpt)[0]


def test_flipped_byte_in_tensor_data(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    f = _tensor_file(ckpt)
    flip_byte(f, f.stat().st_size - 3)  # inside the tensor data: safetensors itself would not notice
    with pytest.raises(IntegrityError, match=f.name) as info:
        verify(ckpt.path)
    assert "hash" in str(info.value)
    with pytest.raises(IntegrityError, match=f.name):
        load_checkpoint(ckpt.path)
    # without the check the damage goes unnoticed: that is what check=True is for
    _, tensors, _ = load_checkpoint(ckpt.path, check=False)
    assert not all(torch.equal(tensors[k], v) for k, v in some_tensors().items())


def test_flipped_byte_in_state_json(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    flip_byte(ckpt.path / STATE, 2)
    with pytest.raises(IntegrityError, match=STATE):
        load_checkpoint(ckpt.path)


def test_truncated_file(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    f = _tensor_file(ckpt)
    size = f.stat().st_size
    overwrite(f, f.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="size") as info:
        load_checkpoint(ckpt.path)
    msg = str(info.value)
    assert f.name in msg and str(size) in msg and str(size - 10) in msg


def test_missing_file(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    _tensor_file(ckpt).unlink()
    with pytest.raises(IntegrityError, match="missing") as info:
        load_checkpoint(ckpt.path)
    assert _tensor_file(ckpt).name in str(info.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    ckpt = write(tmp_path, shard_size=50)
    shards = shard_names(ckpt)
    (ckpt.path / shards[0]).unlink()
    flip_byte(ckpt.path / shards[1], (ckpt.path / shards[1]).stat().st_size - 1)
    overwrite(ckpt.path / STATE, b"{}")
    with pytest.raises(IntegrityError) as info:
        verify(ckpt.path)
    msg = str(info.value)
    assert shards[0] in msg and shards[1] in msg and STATE in msg


@pytest.mark.parametrize("damage", [b"{not json", b"", b"\xff\xfe\x00", b"[1, 2]", b'{"format": "ckpt_track"}',
                                    b'{"format": "other", "format_version": 1, "step": 1, "files": {}}',
                                    b'{"format": "ckpt_track", "format_version": 1, "step": "x", "files": {}}',
                                    b'{"format": "ckpt_track", "format_version": 1, "step": 1, "files": {"a": 3}}'])
def test_damaged_manifest(tmp_path: Path, damage: bytes) -> None:
    ckpt = write(tmp_path)
    overwrite(ckpt.path / MANIFEST, damage)
    for fn in (read_manifest, verify, load_checkpoint):
        with pytest.raises(IntegrityError, match=MANIFEST):
            fn(ckpt.path)


def test_directory_without_manifest(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    (ckpt.path / MANIFEST).unlink()  # what a crash before the commit looks like
    for fn in (read_manifest, verify, load_checkpoint):
        with pytest.raises(CheckpointNotFound, match="no manifest.json"):
            fn(ckpt.path)
    with pytest.raises(LookupError):
        read_manifest(tmp_path / "does-not-exist")


def test_future_format_version(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    rewrite_manifest(ckpt.path, lambda d: d.update(format_version=MAX_FORMAT_VERSION + 1))
    for fn in (read_manifest, verify, load_checkpoint):
        with pytest.raises(IntegrityError, match="upgrade") as info:
            fn(ckpt.path)
        assert f"v{MAX_FORMAT_VERSION + 1}" in str(info.value)


def test_unknown_hash_algorithm(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    rewrite_manifest(ckpt.path, lambda d: d.update(hash_algorithm="md4"))
    with pytest.raises(IntegrityError, match="md4"):
        load_checkpoint(ckpt.path)


@pytest.mark.parametrize("evil", ["../x", "sub/../../x", "ABSOLUTE"])
def test_path_traversal_in_manifest(tmp_path: Path, evil: str) -> None:
    ckpt = write(tmp_path / "store")
    outside = tmp_path / "x"
    outside.write_bytes(b"secret outside the checkpoint")
    name = str(outside) if evil == "ABSOLUTE" else evil
    entry = {"size": outside.stat().st_size, "hash": hash_file(outside)}  # size and hash even match
    rewrite_manifest(ckpt.path, lambda d: d["files"].update({name: entry}))
    with pytest.raises(IntegrityError, match="escapes") as info:
        verify(ckpt.path)
    assert name in str(info.value)
    with pytest.raises(IntegrityError):
        load_checkpoint(ckpt.path)


def test_files_not_in_manifest_are_ignored(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    (ckpt.path / "notes.txt").write_text("added later")
    verify(ckpt.path)
    load_checkpoint(ckpt.path)


# -- copies --------------------------------------------------------------------------
@pytest.mark.parametrize("link", [True, False])
def test_copy_checkpoint(tmp_path: Path, link: bool) -> None:
    src = write(tmp_path / "a", shard_size=50)
    moved: list[int] = []
    dst = copy_checkpoint(src, tmp_path / "b", "copy", link=link, progress=moved.append)

    assert dst.path == tmp_path / "b" / "copy"
    assert entries(tmp_path / "b") == ["copy"]  # no tmp dir left
    assert entries(dst.path) == entries(src.path)
    assert dst.manifest == src.manifest
    assert verify(dst.path) == src.manifest
    assert sum(moved) == src.size
    _, a, sa = load_checkpoint(src.path)
    _, b, sb = load_checkpoint(dst.path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sa["step"] == sb["step"]

    for fname in src.manifest.files:
        same_inode = os.stat(src.path / fname).st_ino == os.stat(dst.path / fname).st_ino
        assert same_inode is link, fname
    # the manifest is always a real copy
    assert os.stat(src.path / MANIFEST).st_ino != os.stat(dst.path / MANIFEST).st_ino

    with pytest.raises(FileExistsError):
        copy_checkpoint(src, tmp_path / "b", "copy", link=link)


def test_copy_falls_back_to_copy_when_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "a")

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    dst = copy_checkpoint(src, tmp_path / "b", "copy", link=True)
    verify(dst.path)


def test_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    src = write(tmp_path / "a")
    _tensor_file(src).unlink()
    with pytest.raises(OSError):
        copy_checkpoint(src, tmp_path / "b", "copy", link=False)
    assert entries(tmp_path / "b") == []


def test_manifest_entry_naming_a_directory(tmp_path: Path) -> None:
    ckpt = write(tmp_path)
    (ckpt.path / "sub").mkdir()
    entry = {"size": (ckpt.path / "sub").stat().st_size, "hash": "0" * 32}
    rewrite_manifest(ckpt.path, lambda d: d["files"].update({"sub": entry}))
    with pytest.raises(IntegrityError, match="sub"):
        verify(ckpt.path)
