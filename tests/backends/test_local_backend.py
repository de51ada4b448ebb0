from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import overwrite

from ckpt_track.backends.local import LocalBackend
from ckpt_track.records import RunSpec
from ckpt_track.testing.contract import BackendContract, make_checkpoint


class TestLocalContract(BackendContract):
    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return ["local://p/r@step=abc", "local://p//r", "local://p/r:v0", "local://p/r@step=-1", "local:/p/r",
                "local://p/r@"]

    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend({"root": str(tmp_path / "store")})

    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict:
        return {"backend": "local", "local": {"root": str(tmp_path / "store")}}


def test_uncommitted_directory_is_never_listed(tmp_path: Path) -> None:
    be = LocalBackend({"root": str(tmp_path)})
    run = be.open_run(RunSpec(project="p"))
    be.put(run, make_checkpoint(tmp_path / "spool", 1), [])
    half = Path(be.list(run)[0].native.path).with_name("v000002")
    half.mkdir()
    (half / "state.json").write_text("{}")  # no manifest: a crash mid-write
    assert [s.version for s in be.list(run)] == [1]


def test_two_processes_write_one_run_without_clobbering(tmp_path: Path) -> None:
    """Two writers on one store: every checkpoint lands under its own version."""
    root = tmp_path / "store"
    be = LocalBackend({"root": str(root)})
    run = be.open_run(RunSpec(project="p", run_id="shared1"))
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ckpt_track.records import RunSpec
        from ckpt_track.backends.local import LocalBackend
        from ckpt_track.testing.contract import make_checkpoint
        be = LocalBackend({{"root": {str(root)!r}}})
        run = be.open_run(RunSpec(project="p", run_id="shared1"))
        who = int(sys.argv[1])
        for i in range(6):
            be.put(run, make_checkpoint(Path({str(tmp_path)!r}) / f"spool{{who}}", who * 100 + i), [f"w{{who}}"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    listed = be.list(run)
    assert [s.version for s in listed] == list(range(1, 13))
    assert sorted(s.step for s in listed) == sorted([100 + i for i in range(6)] + [200 + i for i in range(6)])
    aliases = {a: s.step for s in listed for a in s.aliases}
    assert aliases["w1"] == 105 and aliases["w2"] == 205


def test_a_held_file_with_the_same_name_but_other_bytes_is_not_linked(tmp_path: Path) -> None:
    """Names are digests of the tensors, not of the file bytes (another safetensors version may
    write other header bytes): the store links a held file only when size and hash match too."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from ckpt_track.format import MANIFEST, FileEntry, LocalCheckpoint, hash_file, is_blob, verify
    from ckpt_track.records import RunSpec
    from ckpt_track.testing.contract import blob_state, make_blob_checkpoint

    be = LocalBackend({"root": str(tmp_path / "store")})
    run = be.open_run(RunSpec(project="p", name="r"))
    a = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0))
    be.put(run, a)
    b_path = tmp_path / "spool" / "b"
    shutil.copytree(a.path, b_path)
    fname = sorted(f for f in a.manifest.files if is_blob(f))[0]
    save_file(load_file(str(b_path / fname)), str(b_path / fname), metadata={"format": "pt", "writer": "other"})
    raw = json.loads((b_path / MANIFEST).read_text())
    raw["files"][fname] = {"size": (b_path / fname).stat().st_size, "hash": hash_file(b_path / fname)}
    raw["step"] = 2
    raw.pop("manifest_hash")  # a hand-edited manifest: only a legacy one (no digest) can be
    overwrite(b_path / MANIFEST, json.dumps(raw).encode())
    b = LocalCheckpoint(b_path, verify(b_path))
    assert b.manifest.files[fname] != a.manifest.files[fname] and isinstance(b.manifest.files[fname], FileEntry)
    stored = be.put(run, b)
    verify(Path(stored.native.path))  # its own bytes, not the held file of the same name
    assert stored.uploaded is not None and stored.uploaded >= b.manifest.files[fname].size


def test_delete_removes_files_outside_the_run_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large version is renamed away under the run's lock and its files removed after the
    lock is released, so other writers of the run never wait on the removal."""
    from filelock import FileLock, Timeout

    from ckpt_track.storage import LocalStorage

    be = LocalBackend({"root": str(tmp_path / "store")})
    run = be.open_run(RunSpec(project="p"))
    stored = be.put(run, make_checkpoint(tmp_path / "spool", 1), ["latest"])
    seen: list[bool] = []
    real = LocalStorage.remove_now

    def remove_now(self, path: Path) -> None:  # type: ignore[no-untyped-def]
        try:
            with FileLock(str(Path(run.native.path) / ".lock"), timeout=0):
                seen.append(True)  # free: another writer could go on
        except Timeout:
            seen.append(False)
        real(self, path)

    monkeypatch.setattr(LocalStorage, "remove_now", remove_now)
    be.delete(stored)
    assert seen == [True] and be.list(run) == []
    assert not list(Path(run.native.path, "checkpoints").glob(".deleting-*"))  # the trash is gone too
