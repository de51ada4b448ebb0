"""``ckpt-track projects`` / ``runs``, which rule ``gc`` kept each version by, what a not-found
error lists after a gc, the run config in ``show``, and ``copy --no-link``: against a real local
store built with the public API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error
from typer.testing import CliRunner, Result

import ckpt_track as ct
from ckpt_track.backends.local import LocalBackend
from ckpt_track.cli import app

LOSSES = (0.9, 0.5, 0.7, 0.8)  # v2 is best


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(store))
    return store


def _run(project: str, name: str, losses: tuple[float, ...], config: dict | None = None) -> ct.Run:
    model = torch.nn.Linear(4, 2)
    run = ct.init(project=project, name=name, config=config)
    for i, loss in enumerate(losses):
        with torch.no_grad():
            model.weight.add_(1.0)
        run.log_checkpoint(10 * (i + 1), model=model, metrics={"val/loss": loss}, blocking=True)
    run.finish()
    return run


# --------------------------------------------------------------------------- projects, runs


def test_projects_lists_what_the_store_holds(root: Path) -> None:
    _run("resnet", "a", (0.5,))
    _run("bert", "b", (0.5,))
    result = invoke("projects", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"backend": "local", "project": "bert", "ref": "local://bert"},
        {"backend": "local", "project": "resnet", "ref": "local://resnet"},
    ]
    table = invoke("projects")
    assert table.exit_code == 0, table.output
    assert "ckpt-track runs local://resnet" in table.stdout and "bert" in table.stdout


def test_runs_json_has_stable_keys_and_the_best_metric(root: Path) -> None:
    a = _run("resnet", "first", LOSSES)
    b = _run("resnet", "second", (0.4,))
    result = invoke("runs", "local://resnet", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == ["first", "second"]
    first = records[0]
    assert set(first) == {"ref", "backend", "project", "id", "name", "created", "last_step", "checkpoints", "best"}
    stored = a.checkpoints()
    assert first["ref"] == str(a.ref) and first["id"] == a.ref.segments[1] and first["project"] == "resnet"
    assert first["backend"] == "local" and first["checkpoints"] == 4 and first["last_step"] == 40
    assert first["created"] == stored[0].created
    assert first["best"] == {"ref": str(stored[1].ref), "step": 20, "metric": "val/loss", "value": 0.5}
    assert records[1]["ref"] == str(b.ref) and records[1]["best"]["value"] == 0.4
    # what runs lists is what ls reads
    listed = invoke("ls", first["ref"], "--json")
    assert [r["step"] for r in json.loads(listed.stdout)] == [10, 20, 30, 40]


def test_runs_table_and_the_default_project(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run("resnet", "first", LOSSES)
    monkeypatch.setenv("CKPT_TRACK_PROJECT", "resnet")  # no argument: backend and project of the settings
    result = invoke("runs")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "first" in line)
    assert str(run.ref) in row and "val/loss=0.5 (step 20)" in row and " 40 " in row and " 4 " in row


def test_runs_of_an_unknown_project_names_the_known_ones(root: Path) -> None:
    _run("resnet", "first", (0.5,))
    err = assert_cli_error(invoke("runs", "local://renset"), 3)
    assert "no project 'renset'" in err and "resnet" in err


def test_runs_of_an_unknown_backend_lists_the_backends(root: Path) -> None:
    err = assert_cli_error(invoke("runs", "lcoal://resnet"), 2)
    assert "unknown backend 'lcoal'" in err and "local" in err


# --------------------------------------------------------------------------- gc


def test_gc_says_which_rule_kept_each_version(root: Path) -> None:
    run = _run("p", "r", LOSSES)
    result = invoke("gc", str(run.ref), "--keep-last", "1", "--keep-best", "1", "--metric", "val/loss",
                    "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    kept = {r["version"]: r["kept_by"] for r in doc["keep"]}
    assert kept == {2: ["keep_best", "alias best"], 4: ["keep_last", "alias latest"]}
    assert [r["version"] for r in doc["delete"]] == [1, 3] and all("kept_by" not in r for r in doc["delete"])
    table = invoke("gc", str(run.ref), "--keep-last", "1", "--keep-best", "1", "--metric", "val/loss", "--dry-run")
    assert "kept by" in table.stdout
    rows = {line.split()[0]: line for line in table.stdout.splitlines() if line.split()[:1] in (["v2"], ["v4"])}
    assert "keep-best, alias best" in rows["v2"] and "keep-last, alias latest" in rows["v4"]


def test_a_user_alias_is_named_as_the_rule_that_keeps_it(root: Path) -> None:
    run = _run("p", "r", LOSSES)
    LocalBackend({"root": str(root)}).set_aliases(run.checkpoints()[0], ["golden"])
    doc = json.loads(invoke("gc", str(run.ref), "--keep-last", "1", "--dry-run", "--json").stdout)
    assert {r["version"]: r["kept_by"] for r in doc["keep"]}[1] == ["alias golden"]


def test_not_found_after_gc_lists_only_the_versions_that_remain(root: Path) -> None:
    run = _run("p", "r", (0.9, 0.5, 0.7, 0.8, 0.85, 0.95))
    assert invoke("gc", str(run.ref), "--keep-last", "2").exit_code == 0  # v5, v6 and best (v2) remain
    err = assert_cli_error(invoke("show", f"{run.ref}@step=10"), 3)
    assert "versions v2, v5..v6" in err, err
    assert "v1" not in err


# --------------------------------------------------------------------------- show: the run config


def test_show_displays_the_run_config(root: Path) -> None:
    run = _run("p", "r", (0.5,), config={"lr": 0.001, "optimizer": {"name": "adamw", "betas": [0.9, 0.99]}})
    doc = json.loads(invoke("show", f"{run.ref}@latest", "--json").stdout)
    assert doc["config"] == {"lr": 0.001, "optimizer": {"name": "adamw", "betas": [0.9, 0.99]}}
    out = invoke("show", f"{run.ref}@latest").stdout
    assert "optimizer.name" in out and "adamw" in out and "[0.9, 0.99]" in out


def test_show_of_a_checkpoint_directory_says_the_config_is_not_in_it(root: Path, tmp_path: Path) -> None:
    run = _run("p", "r", (0.5,), config={"lr": 0.001})
    assert invoke("restore", f"{run.ref}@latest", "-o", str(tmp_path / "out")).exit_code == 0
    doc = json.loads(invoke("show", str(tmp_path / "out"), "--json").stdout)
    assert doc["config"] is None and doc["lineage"]["config_hash"]
    out = invoke("show", str(tmp_path / "out")).stdout
    assert "config: not available from a checkpoint directory" in " ".join(out.split())


# --------------------------------------------------------------------------- copy --no-link


def _inodes(run: ct.Run) -> set[int]:
    return {f.stat().st_ino for s in run.checkpoints() for f in Path(s.native.path).iterdir()
            if f.suffix == ".safetensors"}


def test_copy_says_files_were_linked_and_no_link_copies_them(root: Path) -> None:
    src = _run("p", "a", (0.9, 0.5))
    linked = invoke("copy", str(src.ref), "--to", "local://p/linked")
    assert linked.exit_code == 0, linked.output
    assert "hard-linked (read-only, sharing inodes with the source" in " ".join(linked.stdout.split())
    copied = invoke("copy", str(src.ref), "--to", "local://p/copied", "--no-link", "--json")
    assert copied.exit_code == 0, copied.output
    doc = json.loads(copied.stdout)
    assert doc["linked"] == 0 and [c["status"] for c in doc["copied"]] == ["copied", "copied"]
    target = ct.init(project="p", name="copied", resume="must")
    assert not _inodes(target) & _inodes(src)  # independent files: damage to one leaves the other intact
    target.finish()
    again = invoke("copy", str(src.ref), "--to", "local://p/copied2", "--no-link")
    assert "files copied (independent of the source)" in " ".join(again.stdout.split())
