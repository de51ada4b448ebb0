"""A checkpoint directory (what ``ckpt-track restore -o`` and ``average -o`` write) is accepted
wherever a reference is, by ``ct.restore`` and every verb, and verified like a stored checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error
from typer.testing import CliRunner, Result

import ckpt_track as ct
from ckpt_track.cli import app
from ckpt_track.errors import CheckpointNotFound, ConfigError, IntegrityError, InvalidRef
from ckpt_track.format import MANIFEST
from ckpt_track.resolve import Resolver


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ct.Run:
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    r = ct.init(project="p", name="r")
    for step, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
        r.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": loss}, blocking=True)
    r.finish()
    return r


def _restored(run: ct.Run, selector: str, dest: Path) -> Path:
    result = invoke("restore", f"{run.ref}{selector}", "-o", str(dest))
    assert result.exit_code == 0, result.output
    return dest


def _flip(directory: Path) -> None:
    shard = next(p for p in sorted(directory.iterdir()) if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(shard, 0o644)  # committed tensor files may be read-only
    shard.write_bytes(bytes(data))


def test_restore_from_a_directory_matches_the_stored_checkpoint(run: ct.Run, tmp_path: Path) -> None:
    best = _restored(run, "@best", tmp_path / "best")
    direct, from_dir, from_str = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ct.restore(f"{run.ref}@best", model=direct)
    restored = ct.restore(best, model=from_dir)  # a Path
    assert ct.restore("best", model=from_str).step == 2  # a relative path as a string
    assert restored.step == 2 and restored.ref == str(best) and restored.metrics == {"val/loss": 0.5}
    for a, b, c in zip(direct.state_dict().values(), from_dir.state_dict().values(), from_str.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert ct.restore(best / MANIFEST, model=torch.nn.Linear(6, 3)).step == 2  # the manifest names its directory


def test_a_damaged_directory_loads_nothing(run: ct.Run, tmp_path: Path) -> None:
    best = _restored(run, "@best", tmp_path / "best")
    _flip(best)
    model = torch.nn.Linear(6, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IntegrityError, match="content hash does not match"):
        ct.restore(best, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # all or nothing


def test_a_path_that_is_not_a_checkpoint_says_so(run: ct.Run, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="is a directory but not a checkpoint.*holds no manifest.json"):
        ct.restore(tmp_path / "empty", model=torch.nn.Linear(6, 3))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointNotFound, match="is a file, not a checkpoint directory"):
        ct.restore("notes.txt", model=torch.nn.Linear(6, 3))
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        ct.restore(tmp_path / "missing", model=torch.nn.Linear(6, 3))  # a Path is always a path


def test_a_string_that_is_neither_path_nor_ref_is_a_ref_error(run: ct.Run) -> None:
    with pytest.raises(InvalidRef):
        ct.restore("no-such-thing", model=torch.nn.Linear(6, 3))
    assert_cli_error(invoke("show", "no-such-thing"), 2)


def test_every_read_verb_takes_a_directory(run: ct.Run, tmp_path: Path) -> None:
    best = str(_restored(run, "@best", tmp_path / "best"))
    last = str(_restored(run, "@latest", tmp_path / "last"))

    ls = json.loads(invoke("ls", best, "--json").stdout)
    assert [(r["ref"], r["version"], r["step"]) for r in ls] == [(best, 1, 2)]
    show = json.loads(invoke("show", best, "--json").stdout)
    assert show["ref"] == best and show["step"] == 2 and show["metrics"] == {"val/loss": 0.5}
    verified = json.loads(invoke("verify", best, "--json").stdout)
    assert verified["ok"] and verified["ref"] == best

    diff = json.loads(invoke("diff", best, last, "--json").stdout)
    assert diff["step_a"] == 2 and diff["step_b"] == 3 and diff["changed"]
    same = json.loads(invoke("diff", best, f"{run.ref}@best", "--json").stdout)
    assert not same["changed"]

    chain = json.loads(invoke("lineage", best, "--json").stdout)
    assert chain[0]["ref"] == best and [n["step"] for n in chain[1:]] == [1]  # then the stored parent

    again = invoke("restore", best, "-o", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    assert json.loads(invoke("verify", str(tmp_path / "again"), "--json").stdout)["ok"]


def test_verify_and_restore_of_a_damaged_directory_fail(run: ct.Run, tmp_path: Path) -> None:
    best = _restored(run, "@best", tmp_path / "best")
    _flip(best)
    assert "content hash does not match" in assert_cli_error(invoke("verify", str(best)), 4)
    assert_cli_error(invoke("restore", str(best), "-o", str(tmp_path / "out")), 4)
    assert not (tmp_path / "out").exists()


def test_copy_and_average_take_directories(run: ct.Run, tmp_path: Path) -> None:
    best = str(_restored(run, "@best", tmp_path / "best"))
    last = str(_restored(run, "@latest", tmp_path / "last"))
    copied = invoke("copy", best, "--to", "local://p/imported", "--json")
    assert copied.exit_code == 0, copied.output
    target = json.loads(copied.stdout)["copied"]
    assert [(c["from"], c["step"]) for c in target] == [(best, 2)]
    assert [s["step"] for s in json.loads(invoke("ls", "local://p/imported", "--json").stdout)] == [2]

    averaged = invoke("average", best, last, "-o", str(tmp_path / "swa"), "--json")
    assert averaged.exit_code == 0, averaged.output
    doc = json.loads(averaged.stdout)
    assert doc["sources"] == [best, last] and doc["step"] == 3
    swa = torch.nn.Linear(6, 3)
    ct.restore(tmp_path / "swa", model=swa, strict=False)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ct.restore(best, model=a)
    ct.restore(last, model=b)
    assert torch.allclose(swa.weight, (a.weight + b.weight) / 2)


def test_a_directory_is_read_only(run: ct.Run, tmp_path: Path) -> None:
    best = _restored(run, "@best", tmp_path / "best")
    listing = Resolver().run(best)
    with pytest.raises(ConfigError, match="is a checkpoint directory, read-only here.*ckpt-track copy"):
        listing.backend.delete(listing.stored[0])
    assert "delete" not in listing.backend.capabilities  # so gc could never apply retention to it
