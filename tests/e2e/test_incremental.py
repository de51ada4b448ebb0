"""Incremental saves and in-place restore through the public API (local backend):
unchanged tensors are neither written nor uploaded again, a deduplicated checkpoint stays
restorable after its predecessors are deleted, restore fills the model's own tensors, and a
process killed in the middle of a background write leaves no partial checkpoint."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import mlp, writable

import ckpt_track as ct
from ckpt_track.errors import StateMismatch
from ckpt_track.format import is_blob, verify, write_checkpoint
from ckpt_track.state import capture
from ckpt_track.writer import snapshot_tensors

MiB = 1024 * 1024


def _model(seed: int = 0) -> torch.nn.Sequential:
    # four 1 MiB weights (one file each) and small biases (packed together)
    return mlp((512,) * 5, seed)


def _store_files(run: ct.Run, version: int) -> dict[str, os.stat_result]:
    vdir = Path("ckpt_runs") / run.project / run.id / "checkpoints" / f"v{version:06d}"
    return {p.name: p.stat() for p in vdir.iterdir() if is_blob(p.name)}


def _unique_bytes(root: Path) -> int:
    seen: dict[tuple[int, int], int] = {}
    for p in root.rglob("*.safetensors"):
        st = p.stat()
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def test_unchanged_tensors_are_not_written_or_uploaded_again() -> None:
    model = _model()
    with ct.init(project="inc", name="a", monitor=None) as run:
        first = run.log_checkpoint(1, model=model).wait()
        with torch.no_grad():
            model[2].weight.add_(1.0)  # one of four weights changes
        second = run.log_checkpoint(2, model=model).wait()
        third = run.log_checkpoint(3, model=model).wait()  # nothing changes
    assert first is not None and second is not None and third is not None
    assert first.uploaded is not None and first.uploaded >= 4 * MiB
    # the changed weight's file, the small packed file of biases, state.json
    assert second.uploaded is not None and MiB <= second.uploaded < MiB + 64 * 1024, second.uploaded
    assert third.uploaded is not None and third.uploaded < 64 * 1024, third.uploaded

    v1, v2, v3 = (_store_files(run, v) for v in (1, 2, 3))
    assert len(v1) == 5 and len(set(v1) & set(v2)) == 4 and set(v2) == set(v3)
    for name in set(v1) & set(v2):  # the very same file on disk, not a second copy
        assert (v1[name].st_dev, v1[name].st_ino) == (v2[name].st_dev, v2[name].st_ino)
    assert _unique_bytes(Path("ckpt_runs")) < 5.2 * MiB  # three versions, stored once plus the change

    for step, expected in ((1, None), (3, model)):
        fresh = _model(seed=5)
        ct.restore(run.ref.select(step=step), model=fresh)
        if expected is not None:
            assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
        else:
            assert not torch.equal(fresh[2].weight, model[2].weight)


def test_unchanged_files_are_linked_not_serialized(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt_track.format.write as fmt_write  # the module that writes tensor files

    saved: list[list[str]] = []
    real = fmt_write._save

    def counting(path, tensors, **kw):  # type: ignore[no-untyped-def]
        saved.append(sorted(tensors))
        return real(path, tensors, **kw)

    monkeypatch.setattr(fmt_write, "_save", counting)
    model = _model()
    with ct.init(project="inc", name="b", monitor=None) as run:
        run.log_checkpoint(1, model=model).wait()
        assert len(saved) == 5
        saved.clear()
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        run.log_checkpoint(2, model=model).wait()
    assert saved == [["model/0.weight"]]  # only the changed tensor was serialized


def test_deduplicated_checkpoint_restores_after_predecessors_are_deleted() -> None:
    model = _model()
    settings = {"retention": {"keep_last": 1}}
    with ct.init(project="inc", name="c", monitor=None, settings=settings) as run:
        for step in range(1, 5):
            with torch.no_grad():
                model[step % 4].weight.add_(float(step))
            run.log_checkpoint(step, model=model)
    listed = ct.list_checkpoints(run.ref)
    assert [s.step for s in listed] == [4]  # v1-v3 deleted; v4 shares files with them
    verify(Path(listed[0].native.path))
    fresh = _model(seed=9)
    ct.restore(run.ref, model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_restore_reads_into_the_existing_tensors() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    with ct.init(project="inc", name="d", monitor=None) as run:
        run.log_checkpoint(1, model=model, optimizer=opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {k: v.clone() for k, v in opt.state[model[1].weight].items()}

    model(torch.randn(2, 512)).sum().backward()
    opt.step()  # move away from the checkpoint
    params = {k: v.data_ptr() for k, v in model.state_dict().items()}
    opt_state = {k: v.data_ptr() for k, v in opt.state[model[1].weight].items() if v.numel() > 1}

    ct.restore(run.ref, model=model, optimizer=opt)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params  # same memory, new values
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    state = opt.state[model[1].weight]
    assert {k: state[k].data_ptr() for k in opt_state} == opt_state
    assert all(torch.equal(state[k], expected_opt[k]) for k in expected_opt)


def test_mismatch_found_before_anything_is_read() -> None:
    model = _model()
    with ct.init(project="inc", name="e", monitor=None) as run:
        run.log_checkpoint(1, model=model)
    other = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(3)], torch.nn.Linear(512, 4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateMismatch, match="shape mismatch"):
        ct.restore(run.ref, model=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # untouched


def test_sigkill_in_the_middle_of_a_background_write_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "half-written"
    script = textwrap.dedent(f"""
        import time, torch, ckpt_track as ct, ckpt_track.format.write as fmt_write
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
        run = ct.init(project="inc", name="killed", monitor=None)
        run.log_checkpoint(1, model=model).wait()
        real = fmt_write._save
        def stall(path, tensors, **kw):
            real(path, tensors, **kw)
            open({str(marker)!r}, "w").close()  # one file of step 2 is on disk
            time.sleep(600)
        fmt_write._save = stall
        with torch.no_grad():
            model[0].weight.add_(1.0)
        run.log_checkpoint(2, model=model)  # returns; the writer thread stalls mid-checkpoint
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path.cwd())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the child exited early"
            assert time.monotonic() < deadline, "the child never reached the middle of the write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    spool = Path("ckpt_runs") / ".spool"
    half = [p for p in spool.iterdir() if p.name.startswith(".tmp-")]
    assert half and all(not (p / "manifest.json").exists() for p in half)  # the half-written one is hidden
    assert [s.step for s in ct.list_checkpoints("local://inc/killed")] == [1]

    model = _model()
    with ct.init(project="inc", name="killed", monitor=None) as run:
        assert run.resume(model=model) == 2  # resumes from the last whole checkpoint
        run.log_checkpoint(2, model=model)
    assert [s.step for s in ct.list_checkpoints("local://inc/killed")] == [1, 2]


def test_checkpoint_committed_without_its_sidecar_is_uploaded_by_the_next_process() -> None:
    with ct.init(project="inc", name="f", monitor=None) as run:
        run.log_checkpoint(1, model=_model())
    # a process killed between committing step 2 to the spool and writing its sidecar
    c = capture(step=2, model=_model(seed=2))
    write_checkpoint(Path("ckpt_runs") / ".spool", f"inc-{run.id}-step2-deadbeef", snapshot_tensors(c.tensors, copy=True),
                     c.tree, step=2, blobs=True)
    with ct.init(project="inc", name="f", monitor=None) as again:
        again.wait()
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1, 2]


def test_restore_reads_model_tensors_into_their_own_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt_track.format as fmt
    run_mod = importlib.import_module("ckpt_track.restoring")

    model = _model()
    with ct.init(project="inc", name="g", monitor=None) as run:
        run.log_checkpoint(1, model=model)
    target = _model(seed=3)
    live = {f"model/{k}": v.data_ptr() for k, v in target.state_dict().items()}
    seen: dict[str, int] = {}
    real = fmt.load_into

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        seen.update({k: v.data_ptr() for k, v in out.items()})
        return out

    monkeypatch.setattr(run_mod, "load_into", spy)
    ct.restore(run.ref, model=target)
    assert {k: v for k, v in seen.items() if k.startswith("model/")} == live  # read into its own parameter


class _Odd(torch.nn.Module):
    """Tensors a reader can get wrong: empty (twice, equal), 0-d, bool, bf16, int64, a tied pair."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("e1", torch.zeros(0))
        self.register_buffer("e2", torch.zeros(0))
        self.register_buffer("scalar", torch.tensor(float(seed)))
        self.register_buffer("mask", torch.rand(7, generator=g) > 0.5)
        self.register_buffer("bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16))
        self.register_buffer("ids", torch.randint(0, 1000, (11,), generator=g))
        self.lin = torch.nn.Linear(4, 4)
        self.tied = self.lin.weight


@pytest.mark.parametrize("incremental", [True, False])
def test_restore_of_empty_scalar_bool_bf16_and_tied_tensors(incremental: bool) -> None:
    src = _Odd(1)
    with ct.init(project="inc", name=f"odd-{incremental}", monitor=None,
                 settings={"incremental": incremental}) as run:
        run.log_checkpoint(1, model=src)
    dst = _Odd(2)
    ct.restore(run.ref, model=dst)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def test_a_read_that_fails_part_way_is_an_integrity_error(monkeypatch: pytest.MonkeyPatch) -> None:
    run_mod = importlib.import_module("ckpt_track.restoring")
    from ckpt_track.errors import IntegrityError

    with ct.init(project="inc", name="h", monitor=None) as run:
        run.log_checkpoint(1, model=_model())
    real = run_mod.tensor_index

    def truncate_after_verify(files, where):  # type: ignore[no-untyped-def]
        index = real(files, where)
        last = Path(where) / sorted(files)[-1]
        os.truncate(writable(last), last.stat().st_size // 2)  # the disk loses the file's tail after verify
        return index

    monkeypatch.setattr(run_mod, "tensor_index", truncate_after_verify)
    with pytest.raises(IntegrityError, match="failed part way.*restore again"):
        ct.restore(run.ref, model=_model(seed=1))


def test_spool_never_takes_another_runs_checkpoints() -> None:
    with ct.init(project="inc", run_id="base", monitor=None) as base:
        base.log_checkpoint(1, model=_model())
    with ct.init(project="inc", run_id="base-2", monitor=None) as other:
        other.log_checkpoint(1, model=_model())
    # base-2 was killed between committing step 8 to the spool and writing its sidecar
    c = capture(step=8, model=_model(seed=8))
    write_checkpoint(Path("ckpt_runs") / ".spool", "inc-base-2-step8-0123abcd", snapshot_tensors(c.tensors, copy=True),
                     c.tree, step=8, blobs=True)
    with ct.init(project="inc", run_id="base", monitor=None) as again:
        again.wait()
    assert [s.step for s in ct.list_checkpoints(base.ref)] == [1]  # not base-2's step 8
    with ct.init(project="inc", run_id="base-2", monitor=None) as again:
        again.wait()
    assert [s.step for s in ct.list_checkpoints(other.ref)] == [1, 8]


def test_modules_with_their_own_load_logic_still_see_their_keys() -> None:
    model = _model()
    with ct.init(project="inc", name="hooks", monitor=None) as run:
        run.log_checkpoint(1, model=model)
    target = _model(seed=4)
    seen: list[str] = []
    target[1]._register_load_state_dict_pre_hook(
        lambda state_dict, prefix, *args: seen.extend(k for k in state_dict if k.startswith(prefix)))
    ct.restore(run.ref, model=target)
    assert sorted(seen) == ["1.bias", "1.weight"]  # passed to load_state_dict, not only read in place
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
