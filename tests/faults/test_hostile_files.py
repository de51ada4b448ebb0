"""Hostile files in a checkpoint directory: links, special files, escaping or NUL names,
oversized manifests, and JSON or safetensors headers built to crash or execute.

Every read path must refuse them with a typed error (``CkptTrackError``), never follow a
link, never block on a FIFO (each test runs under a watchdog, so a regression fails instead
of hanging), never read more than it must, and never unpickle.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp, overwrite, writable
from typer.testing import CliRunner

import ckpt_track as ct
import ckpt_track.format as fmt
import ckpt_track.format.read as fmt_read
from ckpt_track.cli import app
from ckpt_track.errors import CkptTrackError, IntegrityError
from ckpt_track.format import MANIFEST, STATE, hash_file, load_checkpoint, read_manifest, verify, write_checkpoint

WATCHDOG_S = 20


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """Fail (instead of hanging forever) if a read blocks, e.g. on a FIFO."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the test blocked for more than {WATCHDOG_S} s (a read of a FIFO?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(WATCHDOG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- helpers -------------------------------------------------------------------------
def _model(seed: int = 0) -> torch.nn.Module:
    return mlp((4, 3), seed, norm=True)


def _write(parent: Path) -> fmt.LocalCheckpoint:
    tensors = {"model/w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "model/b": torch.ones(3)}
    return write_checkpoint(parent, "ckpt", tensors, {"step": 5, "epoch": None}, step=5)


def _tensor_file(ckpt: fmt.LocalCheckpoint) -> Path:
    return ckpt.path / next(f for f in ckpt.manifest.files if f.endswith(".safetensors"))


def reseal(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest and give it a valid digest again: what a hostile (not a damaged)
    checkpoint looks like, so that only the checks under test can refuse it."""
    data = json.loads((path / MANIFEST).read_text())
    data.pop("manifest_hash")
    change(data)
    data["manifest_hash"] = fmt.manifest_digest(data)
    overwrite(path / MANIFEST, fmt.canonical_json(data))


def replace_file(path: Path, fname: str, content: bytes) -> None:
    """Put ``content`` in place of one file and record its true size and hash in the manifest."""
    overwrite(path / fname, content)
    entry = {"size": len(content), "hash": hash_file(path / fname)}
    reseal(path, lambda d: d["files"].update({fname: entry}))


def _logged(tmp_path: Path) -> tuple[ct.Run, Path]:
    run = ct.init(project="p", name="r", backend="local", settings={"local": {"root": str(tmp_path / "store")}})
    run.log_checkpoint(1, model=_model(), blocking=True)
    run.finish()
    return run, Path(run.checkpoints()[-1].native.path)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


READERS: dict[str, Callable[[Path], Any]] = {"verify": verify, "load_checkpoint": load_checkpoint}


# -- links and special files --------------------------------------------------------
@pytest.mark.parametrize("reader", sorted(READERS))
def test_symlink_to_dev_zero_as_tensor_file(tmp_path: Path, reader: str) -> None:
    ckpt = _write(tmp_path)
    target = _tensor_file(ckpt)
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(IntegrityError, match="symbolic link"):
        READERS[reader](ckpt.path)


def test_symlink_to_dev_zero_as_manifest(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    (ckpt.path / MANIFEST).unlink()
    (ckpt.path / MANIFEST).symlink_to("/dev/zero")
    for fn in (read_manifest, verify, load_checkpoint):
        with pytest.raises(IntegrityError, match="symbolic link"):
            fn(ckpt.path)


def test_symlink_to_a_valid_file_outside_is_refused_even_when_its_hash_matches(tmp_path: Path) -> None:
    ckpt = _write(tmp_path / "store")
    target = _tensor_file(ckpt)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(target.read_bytes())  # the very bytes the manifest describes
    target.unlink()
    target.symlink_to(outside)
    for fn in READERS.values():
        with pytest.raises(IntegrityError, match="symbolic link"):
            fn(ckpt.path)
    with pytest.raises(IntegrityError, match="symbolic link"):
        fmt.copy_checkpoint(ckpt, tmp_path / "copies", "c", link=True)
    assert not (tmp_path / "copies" / "c").exists()


def test_symlink_to_etc_passwd_fails_verify_and_restore_copies_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run, vdir = _logged(tmp_path)
    passwd = Path("/etc/passwd").read_bytes()
    (vdir / STATE).unlink()
    (vdir / STATE).symlink_to("/etc/passwd")
    entry = {"size": len(passwd), "hash": hash_file(Path("/etc/passwd"))}  # even a matching manifest
    reseal(vdir, lambda d: d["files"].update({STATE: entry}))
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    out = tmp_path / "out"
    for args in (["verify", str(run.ref)], ["restore", str(run.ref), "-o", str(out)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 4, result.output
        assert "Traceback" not in result.output and "symbolic link" in result.stderr
        assert [line for line in result.stderr.splitlines() if not line.startswith("  ")][0].startswith("error: ")
    copied = [p.read_bytes() for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert passwd not in copied
    with pytest.raises(IntegrityError, match="symbolic link"):
        fmt.copy_checkpoint(fmt.LocalCheckpoint(vdir, read_manifest(vdir)), tmp_path / "c", "x", link=False)
    model = _model(3)
    before = _weights(model)
    with pytest.raises(IntegrityError, match="symbolic link"):
        ct.restore(run.ref, model=model, settings=run.settings)
    assert _unchanged(model, before)


@pytest.mark.parametrize("where", ["tensor", "state", "manifest"])
def test_fifo_never_blocks(tmp_path: Path, where: str) -> None:
    ckpt = _write(tmp_path)
    path = {"tensor": _tensor_file(ckpt), "state": ckpt.path / STATE, "manifest": ckpt.path / MANIFEST}[where]
    path.unlink()
    os.mkfifo(path)  # nobody ever writes to it: an open or a read without O_NONBLOCK blocks forever
    for fn in (verify, load_checkpoint):
        with pytest.raises(IntegrityError, match="FIFO"):
            fn(ckpt.path)
    if where == "manifest":
        with pytest.raises(IntegrityError, match="FIFO"):
            read_manifest(ckpt.path)
    else:
        with pytest.raises(IntegrityError, match="FIFO"):
            fmt.copy_checkpoint(ckpt, tmp_path / "copies", "c", link=False)


def test_fifo_in_a_stored_version_does_not_hang_restore_or_listing(tmp_path: Path) -> None:
    run, vdir = _logged(tmp_path)
    shard = next(vdir.glob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    model = _model(3)
    before = _weights(model)
    with pytest.raises(IntegrityError, match="FIFO"):
        ct.restore(run.ref, model=model, settings=run.settings)
    assert _unchanged(model, before)
    (vdir / MANIFEST).unlink()
    os.mkfifo(vdir / MANIFEST)
    with pytest.warns(UserWarning, match="FIFO"):
        assert ct.list_checkpoints(run.ref, settings=run.settings) == []


def test_a_hard_link_is_a_regular_file(tmp_path: Path) -> None:
    ckpt = _write(tmp_path / "store")
    target = _tensor_file(ckpt)
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.link(target, elsewhere)
    target.unlink()
    os.link(elsewhere, target)
    verify(ckpt.path)
    _, tensors, _ = load_checkpoint(ckpt.path)
    assert torch.equal(tensors["model/w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))


@pytest.mark.parametrize("which", ["tensor", "state"])
def test_a_directory_in_place_of_a_file(tmp_path: Path, which: str) -> None:
    ckpt = _write(tmp_path)
    path = _tensor_file(ckpt) if which == "tensor" else ckpt.path / STATE
    path.unlink()
    path.mkdir()
    for fn in READERS.values():
        with pytest.raises(IntegrityError, match="directory"):
            fn(ckpt.path)


def test_a_directory_in_place_of_the_manifest(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    (ckpt.path / MANIFEST).unlink()
    (ckpt.path / MANIFEST).mkdir()
    with pytest.raises(IntegrityError, match="directory"):
        read_manifest(ckpt.path)


# -- names in the manifest --------------------------------------------------------------
@pytest.mark.parametrize("evil", ["../x", "/abs", "a/../../x", "sub/x", "..", ".", "", "a\x00b"])
def test_names_that_escape_or_hold_nul(tmp_path: Path, evil: str) -> None:
    ckpt = _write(tmp_path / "store")
    (tmp_path / "x").write_bytes(b"outside")
    name = str(tmp_path / "x") if evil == "/abs" else evil
    entry = {"size": 7, "hash": hash_file(tmp_path / "x")}
    reseal(ckpt.path, lambda d: d["files"].update({name: entry}))
    for fn in (read_manifest, verify, load_checkpoint):
        with pytest.raises(IntegrityError, match="escapes"):
            fn(ckpt.path)


# -- sizes --------------------------------------------------------------------------
def test_a_200_mb_manifest_is_refused_without_reading_it(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    with open(writable(ckpt.path / MANIFEST), "r+b") as f:
        f.truncate(200 * 1024**2)  # sparse: costs no disk
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(IntegrityError, match="more than"):
            read_manifest(ckpt.path)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2, peak
    assert elapsed < 5


def test_a_tensor_file_bigger_than_the_manifest_says_is_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _write(tmp_path)
    with open(writable(_tensor_file(ckpt)), "ab") as f:
        f.write(b"\0" * 4096)
    hashed: list[int] = []
    real = fmt.hash_open
    monkeypatch.setattr(fmt_read, "hash_open", lambda f, size: hashed.append(size) or real(f, size))
    with pytest.raises(IntegrityError, match="size"):
        verify(ckpt.path)
    assert len(hashed) == 1  # state.json only


# -- JSON built to crash the parser ------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_manifest(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    overwrite(ckpt.path / MANIFEST, b'{"format": "ckpt_track", "x": ' + DEEP + b"}")
    with pytest.raises(IntegrityError, match="nested"):
        read_manifest(ckpt.path)


def test_duplicate_keys_in_manifest(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    raw = (ckpt.path / MANIFEST).read_bytes().replace(b' "step": 5', b' "step": 9,\n "step": 5', 1)
    overwrite(ckpt.path / MANIFEST, raw)
    with pytest.raises(IntegrityError, match="duplicate key 'step'"):
        read_manifest(ckpt.path)


@pytest.mark.parametrize("content", [DEEP, b'{"step": 5, "step": 6}', b'{"a": ' + b"[" * 900 + b"]" * 900 + b"}"],
                         ids=["deep", "duplicate", "900-deep"])
def test_hostile_state_json(tmp_path: Path, content: bytes) -> None:
    ckpt = _write(tmp_path)
    replace_file(ckpt.path, STATE, content)
    verify(ckpt.path)  # the hashes match: only the parser can refuse it
    with pytest.raises(IntegrityError, match=STATE):
        load_checkpoint(ckpt.path)
    with pytest.raises(IntegrityError, match=STATE):
        fmt.read_state(ckpt.path)


# -- safetensors headers ---------------------------------------------------------------
def _safetensors(header: bytes | dict[str, Any], data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


HEADERS: dict[str, bytes] = {
    "deep": _safetensors(DEEP),
    "duplicate": _safetensors(b'{"model/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                              b'"model/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
    "unknown-dtype-huge": _safetensors({"model/w": {"dtype": "XYZ", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
                                       b"\0" * 4),
    "sub-byte-dtype-huge": _safetensors({"model/w": {"dtype": "F4", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
                                        b"\0" * 4),
    "huge-dim-empty": _safetensors({"model/w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}),
    "n=2**63": _safetensors({"model/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, n=2**63),
    "n=0": _safetensors(b"", b"\0" * 16, n=0),
    "overlap": _safetensors({"model/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "model/b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "past-eof": _safetensors({"model/w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "shape-mismatch": _safetensors({"model/w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 16]}},
                                   b"\0" * 16),
    "bool-shape": _safetensors({"model/w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "not-an-object": _safetensors({"model/w": [1, 2, 3]}),
    "truncated": b"\x10\x00\x00",
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_hostile_safetensors_header(tmp_path: Path, name: str) -> None:
    ckpt = _write(tmp_path)
    replace_file(ckpt.path, _tensor_file(ckpt).name, HEADERS[name])
    verify(ckpt.path)  # the hashes match: only the header checks can refuse it
    with pytest.raises(IntegrityError, match="safetensors"):
        load_checkpoint(ckpt.path)


@pytest.mark.parametrize("name", ["deep", "duplicate", "unknown-dtype-huge", "huge-dim-empty", "overlap"])
def test_hostile_header_in_a_stored_version_changes_nothing(tmp_path: Path, name: str) -> None:
    run, vdir = _logged(tmp_path)
    shard = next(vdir.glob("*.safetensors"))
    replace_file(vdir, shard.name, HEADERS[name])
    model = _model(3)
    before = _weights(model)
    with pytest.raises(IntegrityError, match="safetensors"):
        ct.restore(run.ref, model=model, settings=run.settings)
    assert _unchanged(model, before)


# -- pickles never run -------------------------------------------------------------------
def _pickle_payload(marker: Path) -> bytes:
    """Protocol-0 pickle opcodes that, if unpickled, call ``open(marker, "w")`` (creating the
    marker file).  Written by hand: the test suite never imports pickle either."""
    return b"c__builtin__\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def _torch_save_like(marker: Path) -> bytes:
    """A zip laid out like torch.save's output whose data.pkl is the payload."""
    path = marker.with_suffix(".zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _pickle_payload(marker))
        zf.writestr("archive/version", "3\n")
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["pickle", "torch-save-zip"])
@pytest.mark.parametrize("where", ["tensor", "state", "manifest"])
def test_a_pickle_is_never_executed(tmp_path: Path, kind: str, where: str) -> None:
    run, vdir = _logged(tmp_path)
    marker = tmp_path / "PWNED"
    payload = _pickle_payload(marker) if kind == "pickle" else _torch_save_like(marker)
    if where == "manifest":
        overwrite(vdir / MANIFEST, payload)
    else:
        replace_file(vdir, next(vdir.glob("*.safetensors")).name if where == "tensor" else STATE, payload)
    model = _model(3)
    before = _weights(model)
    with pytest.raises(CkptTrackError):
        ct.restore(f"{run.ref}:v1", model=model, settings=run.settings)
    with pytest.raises(CkptTrackError):
        load_checkpoint(vdir)
    if where == "manifest":
        with pytest.raises(IntegrityError):
            verify(vdir)
    assert not marker.exists()
    assert _unchanged(model, before)
