"""Training against checkpoints in a real S3 server (SeaweedFS): kill and resume bit-identical,
restore by step and alias, retention and dedup across runs, and gc of the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpt_track as ct
from ckpt_track.cli import app
from ckpt_track.errors import CheckpointNotFound
from ckpt_track.tools import gc_objects

EXAMPLE = Path(__file__).parents[2] / "examples" / "resume_after_crash.py"
STEPS = 30


def _bucket_path(url: str) -> str:
    return url.removeprefix("s3://")


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_sigkill_then_resume_from_the_bucket_is_bit_identical(tmp_path: Path, s3_root: str, s3_server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_BACKEND="local", CKPT_TRACK_LOCAL__ROOT=s3_root)
    cmd = [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--every", "3"]
    full = subprocess.run([*cmd, "--out", "full.safetensors"], check=False, cwd=tmp_path, env={**env, "RUN_NAME": "whole"},
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([*cmd, "--out", "crashed.safetensors"], cwd=tmp_path, env={**env, "RUN_NAME": "crashy"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "step 17":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    again = subprocess.run([*cmd, "--out", "crashed.safetensors"], check=False, cwd=tmp_path, env={**env, "RUN_NAME": "crashy"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    start = int(again.stdout.rsplit("start was ", 1)[1].split()[0])
    assert 0 < start <= 18
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "crashed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoints live in the bucket; this machine holds only the (drained) spool
    fs = s3_server.filesystem()
    assert fs.find(f"{_bucket_path(s3_root)}/resume-test")
    assert not any(p.name.endswith(".pending.json") for p in (tmp_path / "ckpt_runs" / ".spool").iterdir())


def test_restore_by_step_and_alias_and_cli_listing(tmp_path: Path, s3_root: str, monkeypatch) -> None:
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", s3_root)
    model, opt = _model()
    run = ct.init(project="p", name="r", backend="local")
    weights = {}
    for step in range(4):
        _step(model, opt)
        run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": [3.0, 1.0, 2.0, 4.0][step]})
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    run.finish()
    for selector, step in (("@step=2", 2), ("@best", 1), ("@latest", 3), (":v1", 0)):
        fresh, fresh_opt = _model(seed=9)
        restored = ct.restore(f"{run.ref}{selector}", model=fresh, optimizer=fresh_opt)
        assert restored.step == step
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights[step].items())
    with pytest.raises(CheckpointNotFound, match="step"):
        ct.restore(f"{run.ref}@step=99", model=_model()[0])
    out = CliRunner().invoke(app, ["ls", str(run.ref), "--json"])
    assert out.exit_code == 0, out.output
    assert [r["step"] for r in json.loads(out.output)] == [0, 1, 2, 3]
    verify = CliRunner().invoke(app, ["verify", f"{run.ref}@best"])
    assert verify.exit_code == 0, verify.output


def test_dedup_across_runs_and_retention_keeps_shared_objects(tmp_path: Path, s3_root: str, s3_server,
                                                             monkeypatch) -> None:
    """Two fine-tunes of one base model: the base's tensors are stored once under the prefix, and
    retention in one run never removes an object the other run's versions still reference."""
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", s3_root)
    base, _ = _model()
    frozen = [p for n, p in base.named_parameters() if n.startswith("0.")]
    for p in frozen:
        p.requires_grad_(False)
    handles = {}
    for name in ("a", "b"):
        model = type(base)(*[m for m in base])  # the same module objects: a shared frozen trunk
        head = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        run = ct.init(project="ft", name=name, backend="local", settings={"retention": {"keep_last": 1}})
        handles[name] = [run.log_checkpoint(0, model=model, optimizer=head).wait()]
        run.finish()
    a0, b0 = handles["a"][0], handles["b"][0]
    assert a0 is not None and b0 is not None
    trunk = sum(p.numel() * 4 for p in frozen)
    assert a0.uploaded >= trunk and b0.uploaded < a0.uploaded - trunk // 2  # b sent no trunk bytes

    run = ct.init(project="ft", name="a", backend="local", settings={"retention": {"keep_last": 1}})
    model = type(base)(*[m for m in base])
    head = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    run.resume(model=model, optimizer=head)
    _step(model, head)
    run.log_checkpoint(1, model=model, optimizer=head).wait()
    run.finish()
    assert [s.step for s in ct.list_checkpoints(str(a0.run.ref))] == [1]  # retention removed a@0
    fresh, _ = _model(seed=5)
    ct.restore(f"{b0.run.ref}@latest", model=fresh)  # b's version still has every object it names
    assert torch.equal(fresh[0].weight, base[0].weight)


def test_gc_removes_only_unreferenced_objects(tmp_path: Path, s3_root: str, s3_server, monkeypatch) -> None:
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", s3_root)
    model, opt = _model()
    run = ct.init(project="p", name="gc", backend="local")
    run.log_checkpoint(0, model=model, optimizer=opt).wait()
    run.finish()
    fs = s3_server.filesystem()
    orphan = f"{_bucket_path(s3_root)}/objects/{'ab' * 16}"
    fs.pipe_file(orphan, b"left by a crashed save")
    before = set(fs.find(f"{_bucket_path(s3_root)}/objects"))

    assert gc_objects(s3_root, dry_run=True, grace_s=3600).removed == ()  # young: maybe a save in progress
    dry = CliRunner().invoke(app, ["gc", s3_root, "--dry-run", "--grace", "0", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["objects"] == [f"s3://{orphan}"]
    assert set(fs.find(f"{_bucket_path(s3_root)}/objects")) == before  # a dry run removes nothing
    done = CliRunner().invoke(app, ["gc", s3_root, "--grace", "0"])
    assert done.exit_code == 0, done.output
    assert "removed 1 unreferenced objects" in done.output
    assert set(fs.find(f"{_bucket_path(s3_root)}/objects")) == before - {orphan}
    fresh, _ = _model(seed=3)
    ct.restore(f"{run.ref}@latest", model=fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_a_version_without_its_manifest_is_never_listed(tmp_path: Path, s3_root: str, s3_server,
                                                        monkeypatch) -> None:
    """A crash between the objects and the manifest: nothing is listed, and the next save still
    gets the next number (the manifest, written create-only, is the commit)."""
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", s3_root)
    model, opt = _model()
    run = ct.init(project="p", name="half", backend="local")
    first = run.log_checkpoint(0, model=model, optimizer=opt).wait()
    run.finish()
    assert first is not None
    fs = s3_server.filesystem()
    versions = f"{_bucket_path(s3_root)}/p/{first.run.run_id}/checkpoints"
    fs.pipe_file(f"{_bucket_path(s3_root)}/objects/{'cd' * 16}", b"objects of a save that never committed")
    assert [s.version for s in ct.list_checkpoints(str(first.run.ref))] == [1]
    # a manifest taken by another writer meanwhile: the save moves on to the next number
    fs.pipe_file(f"{versions}/v000002.json", fs.cat_file(f"{versions}/v000001.json"))
    run = ct.init(project="p", name="half", backend="local")
    second = run.log_checkpoint(1, model=model, optimizer=opt).wait()
    run.finish()
    assert second is not None and second.version == 3


def test_a_writer_racing_for_a_version_number_never_overwrites_it(tmp_path: Path, s3_root: str, s3_server,
                                                                  monkeypatch) -> None:
    """Two writers list the run at once and both want v2: the manifest is written create-only,
    so the second one gets v3 and the first one's v2 stays as it was (the store checks it)."""
    from ckpt_track.objstore import ObjectProjects, ObjectStore
    from ckpt_track.testing.contract import make_checkpoint

    projects = ObjectProjects(ObjectStore(s3_root))
    rdir = projects.create("p", "race", {"name": "race"}, lambda: "race")
    rdir.add(make_checkpoint(tmp_path / "a", 1))
    first, _ = rdir.add(make_checkpoint(tmp_path / "a", 2))
    assert first.number == 2
    before = s3_server.filesystem().cat_file(rdir.version_path(2))
    monkeypatch.setattr(type(rdir), "numbers", lambda self: [1])  # this writer listed before v2 was committed
    monkeypatch.setattr(type(rdir), "meta", lambda self: {"last_version": 1})
    late, _ = rdir.add(make_checkpoint(tmp_path / "b", 3))
    assert late.number == 3
    assert s3_server.filesystem().cat_file(rdir.version_path(2)) == before
