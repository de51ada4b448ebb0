"""File modes of stores and caches (issue 15, bugs 1 and 2): a committed checkpoint's files are
read-only with the read bits the umask gives, so hard links between versions, runs and cache
entries are safe and a colleague can restore from a shared store; ``copy(link=False)`` makes an
independent copy.  The flows that must never open a committed file for writing run as an
unprivileged user (when the tests run as root, which ignores file modes)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import mlp

import ckpt_track as ct
from ckpt_track import cache
from ckpt_track.format import MANIFEST, read_only_mode, seal, verify, write_checkpoint
from ckpt_track.format.modes import current_umask, seal_file
from ckpt_track.ops.copy import copy
from ckpt_track.restoring import restore_into

UMASKS = [0o022, 0o027]
NOBODY = 65534


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:04o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _versions(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/checkpoints/v*"))


def _log(project: str, name: str, steps: int = 2) -> ct.Run:
    model = mlp((512, 512, 8))  # a 1 MiB weight (direct I/O) and small tensors (packed)
    with ct.init(project=project, name=name, monitor=None) as run:
        for step in range(1, steps + 1):
            with torch.no_grad():
                model[-1].bias.add_(1.0)  # the packed file changes, the large one is linked
            run.log_checkpoint(step, model=model, metrics={"loss": 1.0 / step}).wait()
    return run


def test_current_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask and current_umask() == umask
    assert read_only_mode() == 0o444 & ~umask and read_only_mode(0o077) == 0o400


def test_a_committed_store_has_the_modes_the_umask_gives(umask: int) -> None:
    _log("modes", "a")
    root = Path("ckpt_runs")
    versions = _versions(root)
    assert len(versions) == 2
    for vdir in versions:
        files = list(vdir.iterdir())
        assert any(f.name.endswith(".safetensors") for f in files) and (vdir / MANIFEST) in files
        # tensor files and the JSON files alike: readable as the umask allows, never writable
        assert {f.name: _mode(f) for f in files} == {f.name: 0o444 & ~umask for f in files}
        verify(vdir)
    rdir = versions[0].parent.parent
    for d in (root, rdir.parent, rdir, versions[0].parent, *versions):
        assert _mode(d) == 0o777 & ~umask, d
    for table in ("run.json", "aliases.json"):  # tables replaced whole, never files of a checkpoint
        assert _mode(rdir / table) == 0o666 & ~umask


def test_written_and_copied_checkpoints_are_read_only(tmp_path: Path, umask: int) -> None:
    tensors = {"big": torch.zeros(300_000), "small": torch.ones(3)}
    ckpt = write_checkpoint(tmp_path, "w", tensors, {"step": 1}, step=1, blobs=True)
    out = restore_into(ckpt, tmp_path / "out")  # what restore -o writes
    for d in (ckpt.path, out.path):
        assert {_mode(f) for f in d.iterdir()} == {0o444 & ~umask}
    # restore -o writes an independent copy: nothing shared with the store
    assert all(os.stat(out.path / f).st_ino != os.stat(ckpt.path / f).st_ino for f in ckpt.manifest.files)


def test_the_cache_gives_downloads_the_umask_read_bits(tmp_path: Path, umask: int) -> None:
    """A tracker SDK may download into files of its own mode (a temporary file's 0600):
    the cache entry a colleague shares still gets the umask's read bits, read-only."""
    src = write_checkpoint(tmp_path, "src", {"w": torch.arange(10.0)}, {"step": 1}, step=1, blobs=True)

    def own(into: Path) -> None:
        for f in os.listdir(src.path):
            fd = os.open(into / f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write((src.path / f).read_bytes())

    got = cache.fetch(tmp_path / "cache" / "v000001", own)
    assert {f.name: _mode(f) for f in got.path.iterdir()} == {f: 0o444 & ~umask for f in os.listdir(src.path)}
    verify(got.path)


def test_copy_in_one_store_links_read_only_files_or_copies_them() -> None:
    src_run = _log("p", "a", steps=1)
    src = _versions(Path("ckpt_runs"))[0]

    linked = copy(f"local://p/{src_run.id}@latest", "local://p/b")
    assert len(linked.copied) == 1 and linked.linked == _nfiles(src)
    (b_ver,) = _other("b")
    for f in _tensor_and_state(src):
        a, b = os.stat(src / f), os.stat(b_ver / f)
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)  # shared: safe only because read-only
        assert not a.st_mode & 0o222

    independent = copy(f"local://p/{src_run.id}@latest", "local://p/c", link=False)
    assert len(independent.copied) == 1 and independent.linked == 0
    c_ver = _other("c")[0]
    inodes = {os.stat(p / f).st_ino for p in (src, c_ver) for f in os.listdir(src)}
    assert len(inodes) == 2 * len(os.listdir(src))  # every file of c has its own inode
    assert {_mode(c_ver / f) for f in os.listdir(c_ver)} == {0o444 & ~current_umask()}
    verify(c_ver)


def _tensor_and_state(vdir: Path) -> list[str]:
    return [f for f in os.listdir(vdir) if f != MANIFEST]


def _nfiles(vdir: Path) -> int:
    return len(_tensor_and_state(vdir))  # the manifest is always written anew, never linked


def _other(name: str) -> list[Path]:
    import json

    for rdir in Path("ckpt_runs/p").iterdir():
        if rdir.is_dir() and json.loads((rdir / "run.json").read_text()).get("name") == name:
            return sorted((rdir / "checkpoints").glob("v*"))
    raise AssertionError(f"no run {name!r}")


def test_seal_never_narrows_a_shared_file(tmp_path: Path, umask: int) -> None:
    d = tmp_path / "d"
    d.mkdir()
    fresh, sealed, shared = d / "fresh", d / "sealed", d / "shared"
    for p in (fresh, sealed, shared):
        p.write_bytes(b"x")
    os.chmod(fresh, 0o600)  # as a temporary file gets it: widened to the umask's read bits
    os.chmod(sealed, 0o404)  # already read-only: left as it is
    os.chmod(shared, 0o664)
    os.link(shared, tmp_path / "elsewhere")  # another checkpoint's link: only loses its write bits
    os.symlink(fresh, d / "link")
    seal(d)
    assert (_mode(fresh), _mode(sealed), _mode(shared)) == (0o444 & ~umask, 0o404, 0o444)
    assert stat.S_ISLNK(os.lstat(d / "link").st_mode)
    seal_file(fresh)  # idempotent
    assert _mode(fresh) == 0o444 & ~umask


# -- as other users (root only: root itself ignores modes) ------------------------------
# The interpreter may live where only root can read it (a private pyenv), so the child starts as
# root, runs its flow once as root to import every module it needs, then drops to the user.
_CHILD = """
import os, sys
uid, gid, mask, role, work, scratch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 8), *sys.argv[4:7]
os.umask(mask)
import torch
import ckpt_track as ct
from ckpt_track.format import verify
from ckpt_track.ops.copy import copy
from ckpt_track.ops.gc import gc


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))


def owner():
    m = model()
    for resume, steps in (("never", (1, 2, 3)), ("must", (4, 5, 6))):  # resumed: links from the spool
        with ct.init(project="p", name="a", monitor=None, resume=resume) as run:
            for step in steps:
                with torch.no_grad():
                    m[1].bias.add_(1.0)
                run.log_checkpoint(step, model=m).wait()
    assert copy(f"local://p/{run.id}", "local://p/b").linked > 0
    assert copy(f"local://p/{run.id}", "local://p/c", link=False).linked == 0
    copy(f"local://p/{run.id}@latest", "local://p/c", link=False)  # already there: skipped
    assert len(gc(f"local://p/{run.id}", keep_last=2).deleted) == 4  # deletes read-only files
    for top, dirs, _ in os.walk("ckpt_runs"):
        for d in (os.path.join(top, d) for d in dirs if d.startswith("v0")):
            verify(d)
            assert all(not os.stat(os.path.join(d, f)).st_mode & 0o222 for f in os.listdir(d)), d
    torch.save(m.state_dict(), "expected.pt")
    return run.id


def reader():
    m = model()
    ct.restore(f"local://p/{sys.argv[7]}@latest?root={sys.argv[8]}", model=m)
    expected = torch.load(sys.argv[9], weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in m.state_dict().items())
    return "ok"


flow = owner if role == "owner" else reader
os.chdir(scratch)
flow()  # as root: imports what the flow needs
os.chdir(work)
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
print("done", flow())
"""


def _as_user(uid: int, gid: int, mask: int, role: str, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    scratch = work.parent / f"{work.name}-as-root"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(HOME=str(work), XDG_CACHE_HOME=str(work / "cache"), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", _CHILD, str(uid), str(gid), f"{mask:o}", role, str(work),
                           str(scratch), *args], check=False, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own temporary directories are private)."""
    top = Path(tempfile.mkdtemp(prefix="ckpt-track-modes-"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:04o}")
def test_another_user_restores_from_a_shared_store(shared_dir: Path, mask: int) -> None:
    """The owner's whole flow (save, resume, copy linked and not, gc) never opens a committed file
    for writing; a colleague in the owner's group restores from the store, and anyone else too
    unless the umask withholds it; nobody but the owner writes to the store."""
    owner = shared_dir / "owner"
    owner.mkdir()
    os.chown(owner, NOBODY, NOBODY)
    done = _as_user(NOBODY, NOBODY, mask, "owner", owner)
    assert done.returncode == 0, done.stderr[-3000:]
    store = owner / "ckpt_runs"
    before = _tree(store)
    args = (done.stdout.split()[-1], str(store), str(owner / "expected.pt"))
    for who, gid, can in ((1, NOBODY, True), (1, 1, not mask & 0o004)):  # a colleague in the group; anyone else
        reader = shared_dir / f"reader-{who}-{gid}"
        reader.mkdir()
        os.chown(reader, who, gid)
        got = _as_user(who, gid, 0o022, "reader", reader, *args)
        assert (got.returncode == 0) == can, (who, gid, got.stdout, got.stderr[-3000:])
        if not can:
            assert "Permission" in got.stderr, got.stderr[-3000:]
    assert _tree(store) == before
