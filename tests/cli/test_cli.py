"""The ``ckpt-track`` command line, against a real local store built with the public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error, overwrite
from typer.testing import CliRunner, Result

import ckpt_track as ct
from ckpt_track.cli import app, exit_code, human_size
from ckpt_track.format import MANIFEST, verify

STEPS = (10, 20, 30)
LOSSES = (0.9, 0.5, 0.7)  # the middle one is best, so "best" and "latest" differ


@dataclass(frozen=True)
class Store:
    root: Path
    run_ref: str  # local://p/<run id>
    stored: list[ct.Stored]  # oldest version first

    def path(self, version: int) -> Path:
        return Path(self.stored[version - 1].native.path)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Three checkpoints of a small Linear model in a store under ``tmp_path``."""
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):  # the caller's settings must not change what we test
            monkeypatch.delenv(key)
    monkeypatch.delenv("COLUMNS", raising=False)  # tables are asserted at their natural width
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "store"
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(root))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    run = ct.init(project="p", name="r")
    for epoch, (step, loss) in enumerate(zip(STEPS, LOSSES)):
        with torch.no_grad():
            model.weight.add_(1.0)  # each checkpoint holds different bytes
        run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, epoch=epoch, blocking=True)
    run.finish()
    return Store(root, str(run.ref), run.checkpoints())


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


assert_one_line_error = assert_cli_error


# --------------------------------------------------------------------------- ls


def test_ls_table_lists_versions_metrics_and_refs(store: Store) -> None:
    result = invoke("ls", store.run_ref)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "val/loss" in out and "aliases" in out and "created" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["v1"], ["v2"], ["v3"])}
    assert set(rows) == {"v1", "v2", "v3"}
    for version, step, loss in zip((1, 2, 3), STEPS, LOSSES):
        row = rows[f"v{version}"]
        assert f" {step} " in row and f"{loss:g}" in row
        assert f"{store.run_ref}:v{version}" in row
        assert human_size(store.stored[version - 1].size) in row and "KiB" in row
    assert "best" in rows["v2"] and "latest" in rows["v3"]
    assert "step-" not in out  # omitted for width by default


def test_ls_all_aliases_shows_step_aliases(store: Store) -> None:
    result = invoke("ls", store.run_ref, "--all-aliases")
    assert result.exit_code == 0, result.output
    assert all(f"step-{s}" in result.stdout for s in STEPS)


def test_ls_json(store: Store) -> None:
    result = invoke("ls", store.run_ref, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["version"] for r in records] == [1, 2, 3]
    for record, s in zip(records, store.stored):
        assert set(record) == {"ref", "version", "step", "epoch", "aliases", "metrics", "size", "created"}
        assert record["ref"] == str(s.ref)
        assert record["step"] == s.step and record["epoch"] == s.epoch
        assert record["aliases"] == list(s.aliases) and f"step-{s.step}" in record["aliases"]
        assert record["metrics"] == dict(s.metrics)
        assert record["size"] == s.size > 0
        assert record["created"] == s.created


def test_json_is_strict_for_nan_metrics(store: Store) -> None:
    run = ct.init(project="p", name="nan")
    run.log_checkpoint(1, model=torch.nn.Linear(2, 2), metrics={"val/loss": float("nan")}, blocking=True)
    run.finish()
    result = invoke("ls", str(run.ref), "--json")
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout
    assert json.loads(result.stdout)[0]["metrics"] == {"val/loss": None}


def test_damaged_checkpoint_is_a_warning_line(store: Store) -> None:
    overwrite(store.path(1) / MANIFEST, b"not json")
    result = invoke("ls", store.run_ref, "--json")
    assert result.exit_code == 0, result.output
    assert [r["version"] for r in json.loads(result.stdout)] == [2, 3]
    assert result.stderr.startswith("warning: skipping damaged checkpoint")


def test_ls_ignores_the_selector(store: Store) -> None:
    result = invoke("ls", f"{store.run_ref}@step=10", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3


def test_root_can_come_from_the_ref(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPT_TRACK_LOCAL__ROOT")
    result = invoke("ls", f"{store.run_ref}?root={store.root}", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3


def test_run_name_works_as_well_as_the_id(store: Store) -> None:
    result = invoke("show", "local://p/r@best", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 2


# --------------------------------------------------------------------------- show


def test_show_json_has_manifest_ref_and_lineage(store: Store) -> None:
    result = invoke("show", f"{store.run_ref}@step=20", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    on_disk = json.loads((store.path(2) / MANIFEST).read_text())
    for key, value in on_disk.items():
        assert data[key] == value, key
    assert data["ref"] == f"{store.run_ref}:v2"
    assert data["version"] == 2
    assert set(data["aliases"]) == {"best", "step-20"}
    assert data["step"] == 20 and data["epoch"] == 1
    assert data["metrics"] == {"val/loss": 0.5}
    lineage = data["lineage"]
    assert lineage["run"] == store.run_ref
    assert lineage["parent"] == f"{store.run_ref}@step=10"
    assert lineage["resumed_from"] is None
    assert {"git", "config_hash", "host", "versions"} <= set(lineage)
    assert any(name.endswith(".safetensors") for name in data["files"])
    assert data["size"] == sum(f["size"] for f in data["files"].values())


def test_show_human_output(store: Store) -> None:
    result = invoke("show", f"{store.run_ref}@latest")
    assert result.exit_code == 0, result.output
    out = result.stdout
    data = json.loads((store.path(3) / MANIFEST).read_text())
    assert f"{store.run_ref}:v3" in out
    assert f"{store.run_ref}@step=20" in out  # the parent
    assert data["lineage"]["config_hash"] in out
    for name, entry in data["files"].items():
        assert name in out and entry["hash"] in out


# --------------------------------------------------------------------------- restore


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_restore_copies_files_and_manifest(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "restored" / "best"
    result = invoke("restore", f"{store.run_ref}@best", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == {"ref": f"{store.run_ref}:v2", "path": str(out), "step": 20, "size": store.stored[1].size}
    assert _files(out) == _files(store.path(2))
    assert verify(out).step == 20
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_restore_human_output_and_empty_existing_dir(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    result = invoke("restore", store.run_ref, "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert f"{store.run_ref}:v3" in result.stdout and str(out) in result.stdout
    assert _files(out) == _files(store.path(3))


def test_restore_refuses_a_non_empty_dir(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    stderr = assert_one_line_error(invoke("restore", store.run_ref, "-o", str(out)), 2)
    assert "not empty" in stderr and "--force" in stderr
    # --force replaces only an earlier restore, never an arbitrary directory
    assert_one_line_error(invoke("restore", store.run_ref, "-o", str(out), "--force"), 2)
    assert _files(out) == {"notes.txt": b"keep me"}


def test_restore_refuses_a_file_as_output(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    stderr = assert_one_line_error(invoke("restore", store.run_ref, "-o", str(target), "--force"), 2)
    assert "not a directory" in stderr and target.read_text() == "x"


def test_restore_force_replaces_an_earlier_restore(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    assert invoke("restore", f"{store.run_ref}:v1", "-o", str(out)).exit_code == 0
    assert_one_line_error(invoke("restore", f"{store.run_ref}:v3", "-o", str(out)), 2)
    result = invoke("restore", f"{store.run_ref}:v3", "-o", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert _files(out) == _files(store.path(3))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_restore_refuses_a_corrupt_checkpoint(store: Store, tmp_path: Path) -> None:
    _flip_a_byte(store.path(3))
    out = tmp_path / "out"
    assert_one_line_error(invoke("restore", store.run_ref, "-o", str(out)), 4)
    assert not out.exists()


# --------------------------------------------------------------------------- verify


def _flip_a_byte(checkpoint: Path) -> str:
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: same size, other hash
    overwrite(shard, bytes(data))
    return shard.name


def test_verify_ok(store: Store) -> None:
    result = invoke("verify", f"{store.run_ref}:v1")
    assert result.exit_code == 0, result.output
    manifest = verify(store.path(1))
    assert result.stdout.startswith("OK ")
    assert f"{len(manifest.files)} files" in result.stdout and str(manifest.size) in result.stdout


def test_verify_ok_json(store: Store) -> None:
    result = invoke("verify", f"{store.run_ref}:v1", "--json")
    assert result.exit_code == 0, result.output
    manifest = verify(store.path(1))
    assert json.loads(result.stdout) == {
        "ref": f"{store.run_ref}:v1", "ok": True, "files": len(manifest.files), "bytes": manifest.size, "error": None,
    }


def test_verify_detects_a_flipped_byte(store: Store) -> None:
    name = _flip_a_byte(store.path(2))
    stderr = assert_one_line_error(invoke("verify", f"{store.run_ref}@best"), 4)
    assert name in stderr
    # the other versions are untouched
    assert invoke("verify", f"{store.run_ref}:v1").exit_code == 0


def test_verify_failure_json(store: Store) -> None:
    name = _flip_a_byte(store.path(3))
    result = invoke("verify", store.run_ref, "--json")
    assert result.exit_code == 4
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["ref"] == f"{store.run_ref}:v3"
    assert name in data["error"]
    assert result.stderr.startswith("error: ")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ref", ["not a ref", "local://p/r@step=x", "local://p"])
def test_bad_ref_is_a_usage_error(store: Store, ref: str) -> None:
    assert_one_line_error(invoke("show", ref), 2)


def test_unknown_step_lists_the_available_steps(store: Store) -> None:
    stderr = assert_one_line_error(invoke("show", f"{store.run_ref}@step=15"), 3)
    assert "available steps: 10, 20, 30" in stderr.splitlines()[0]


def test_unknown_run_is_not_found(store: Store) -> None:
    stderr = assert_one_line_error(invoke("ls", "local://p/nosuchrun"), 3)
    assert "nosuchrun" in stderr


def test_bad_settings_are_a_usage_error(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOTS", "/x")
    stderr = assert_one_line_error(invoke("ls", store.run_ref), 2)
    assert "CKPT_TRACK_LOCAL__ROOTS" in stderr


def test_exit_codes_per_error_class() -> None:
    assert exit_code(ct.UnknownBackend("x", ["local"])) == 2
    assert exit_code(ct.InvalidRef("x")) == 2
    assert exit_code(ct.CheckpointNotFound("x")) == 3
    assert exit_code(ct.IntegrityError("x")) == 4
    assert exit_code(ct.AuthError("x")) == 5
    assert exit_code(ct.BackendNotInstalled("mlflow")) == 5
    assert exit_code(ct.StateMismatch("x")) == 1
    assert exit_code(ct.CkptTrackError("x")) == 1


def test_help_documents_exit_codes_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Exit codes" in result.stdout and "integrity" in result.stdout
    for command in ("ls", "show", "restore", "verify"):
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Examples:" in sub.stdout and "    ckpt-track " + command in sub.stdout
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"ckpt-track {ct.__version__}"


# --------------------------------------------------------------------------- entry point


@pytest.mark.slow
def test_module_entry_point_runs(store: Store) -> None:
    env = {**os.environ, "CKPT_TRACK_LOCAL__ROOT": str(store.root)}
    ok = subprocess.run([sys.executable, "-m", "ckpt_track.cli", "ls", store.run_ref, "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert [r["step"] for r in json.loads(ok.stdout)] == list(STEPS)
    missing = subprocess.run([sys.executable, "-m", "ckpt_track.cli", "show", f"{store.run_ref}@step=7"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 3
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
