"""A verified restore close to a raw read: every file hashed once (a cached copy is not re-hashed
before restore hashes it), hashing and reading in a few threads, tensors read straight into
their destination; and still all or nothing, a rotted cache entry still caught."""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from helpers import mlp, writable

import ckpt_track as ct
import ckpt_track.format.read as fmt_read
from ckpt_track import cache
from ckpt_track.errors import IntegrityError
from ckpt_track.format import LocalCheckpoint, verify, write_checkpoint
from ckpt_track.resolve import resolve


class _Hashes:
    """Every xxh3-128 digest computed while counting (by value: a file's digest is its manifest
    hash), whichever thread computed it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.digests: Counter[str] = Counter()
        self.counting = False
        real, lock, outer = xxhash.xxh3_128, threading.Lock(), self

        class Counting:
            def __init__(self, *args: Any) -> None:
                self._h = real(*args)

            def update(self, data: Any) -> None:
                self._h.update(data)

            def hexdigest(self) -> str:
                digest = self._h.hexdigest()
                if outer.counting:
                    with lock:
                        outer.digests[digest] += 1
                return digest

            def __getattr__(self, name: str) -> Any:
                return getattr(self._h, name)

        monkeypatch.setattr(xxhash, "xxh3_128", Counting)

    def during(self, fn: Any) -> tuple[Counter[str], Any]:
        """(the digests computed while ``fn()`` ran, what it returned)."""
        self.digests.clear()
        self.counting = True
        try:
            out = fn()
        finally:
            self.counting = False
        return Counter(self.digests), out


def _trained() -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    model = mlp([64, 600, 600, 8], seed=1)  # two tensors over a MiB: files of their own
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, opt


def _saved(monkeypatch: pytest.MonkeyPatch, root: str) -> tuple[str, dict[str, torch.Tensor]]:
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", root)
    model, opt = _trained()
    with ct.init(project="speed", name="r", monitor=None) as run:
        run.log_checkpoint(1, model=model, optimizer=opt, blocking=True)
    return f"{run.ref}@step=1", {k: v.clone() for k, v in model.state_dict().items()}


def _restore_fresh(ref: str) -> torch.nn.Sequential:
    model, opt = _trained()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ct.restore(ref, model=model, optimizer=opt)
    return model


def _files_hashed(hashes: Counter[str], ckpt: LocalCheckpoint) -> dict[str, int]:
    return {f: hashes[e.hash] for f, e in sorted(ckpt.manifest.files.items())}


def test_restore_from_local_backend_hashes_each_file_once(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    ref, _ = _saved(monkeypatch, str(tmp_path / "store"))
    ckpt = resolve(ref).fetch()
    hashes = _Hashes(monkeypatch)
    counted, _ = hashes.during(lambda: _restore_fresh(ref))
    assert len(ckpt.manifest.files) >= 3
    assert _files_hashed(counted, ckpt) == dict.fromkeys(sorted(ckpt.manifest.files), 1)


def test_restore_from_the_download_cache_hashes_each_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, want = _saved(monkeypatch, f"memory://ckpt-speed-{uuid.uuid4().hex[:8]}")
    hashes = _Hashes(monkeypatch)
    for attempt in ("downloaded", "cache hit"):
        counted, model = hashes.during(lambda: _restore_fresh(ref))
        ckpt = resolve(ref).fetch()  # the cache entry
        assert _files_hashed(counted, ckpt) == dict.fromkeys(sorted(ckpt.manifest.files), 1), attempt
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items()), attempt


def test_a_rotted_cache_entry_is_caught_and_fetched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, want = _saved(monkeypatch, f"memory://ckpt-speed-{uuid.uuid4().hex[:8]}")
    _restore_fresh(ref)  # fills the cache
    entry = resolve(ref).fetch()
    big = max(entry.manifest.files, key=lambda f: entry.manifest.files[f].size)
    with open(writable(entry.path / big), "r+b") as f:  # same size, one byte changed: only a hash sees it
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cache.cached(entry.path) is None  # outside a restore a cache hit is re-hashed, as ever
    model = _restore_fresh(ref)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    verify(entry.path)  # the entry was fetched anew


def test_verify_in_threads_still_names_every_bad_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fmt_read, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(fmt_read, "_workers", lambda tasks: min(tasks, 3))
    threads: set[str] = set()
    real = fmt_read._file_problem

    def spy(*args: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(fmt_read, "_file_problem", spy)
    tensors = {f"t{i}": torch.full((300_000,), float(i)) for i in range(4)}
    ckpt = write_checkpoint(tmp_path, "c", tensors, {"step": 1}, step=1, blobs=True, pack_size=1000)
    verify(ckpt.path)
    names = sorted(f for f in ckpt.manifest.files if f.endswith(".safetensors"))
    for fname in names[:2]:
        with open(writable(ckpt.path / fname), "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\0\1\2\3")
    os.truncate(writable(ckpt.path / names[2]), 100)
    with pytest.raises(IntegrityError, match="failed verification") as err:
        verify(ckpt.path)
    lines = str(err.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == names[:3]  # every bad file, in name order
    assert "content hash does not match" in lines[0] and "truncated" in lines[2]
    assert len(threads) > 1 and all(t.startswith("ckpt_track-read") for t in threads)


def test_tensors_are_read_in_pieces_by_several_threads_into_their_own_memory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fmt_read, "_PIECE", 4096)
    monkeypatch.setattr(fmt_read, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(fmt_read, "_workers", lambda tasks: min(tasks, 4))
    tensors = {"a": torch.randn(300_000), "b": torch.arange(70_001, dtype=torch.int64), "c": torch.randn(3, 5),
               "d": torch.zeros(0), "e": torch.tensor(True), "f": torch.randn(1000).to(torch.bfloat16)}
    ckpt = write_checkpoint(tmp_path, "c", tensors, {"step": 1}, step=1, blobs=True, pack_size=1000)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    ptrs = {k: v.data_ptr() for k, v in targets.items()}
    with ExitStack() as stack:
        files = fmt_read.open_verified(ckpt.path, ckpt.manifest, stack)
        fds = {f: files[f] for f in fmt_read.tensor_files(ckpt.manifest)}
        index = fmt_read.tensor_index(fds, ckpt.path)
        out = fmt_read.load_into(ckpt.path, fds, index, targets)
        assert all(torch.equal(out[k], v) for k, v in tensors.items())
        assert {k: out[k].data_ptr() for k in tensors} == ptrs  # no second copy
        fresh = fmt_read.load_into(ckpt.path, fds, index, {})
        assert all(torch.equal(fresh[k], v) for k, v in tensors.items())
        os.truncate(writable(ckpt.path / index["a"].file), index["a"].start + 10_000)  # changed after hashing
        with pytest.raises(IntegrityError, match=r"ended inside tensor 'a' \(truncated\)"):
            fmt_read.load_into(ckpt.path, fds, {"a": index["a"]}, targets)


def test_a_file_object_without_a_descriptor_is_read_through_readinto(tmp_path: Path) -> None:
    t = torch.randn(5000)
    ckpt = write_checkpoint(tmp_path, "c", {"t": t}, {"step": 1}, step=1)
    with ExitStack() as stack:
        files = fmt_read.open_verified(ckpt.path, ckpt.manifest, stack)
        fds = {f: files[f] for f in fmt_read.tensor_files(ckpt.manifest)}
        info = fmt_read.tensor_index(fds, ckpt.path)["t"]
        data = io.BytesIO((ckpt.path / info.file).read_bytes())
    assert torch.equal(fmt_read.read_tensor(data, info.file, info), t)
