"""An unknown backend in the environment (``CKPT_TRACK_BACKEND=nosuch``) breaks only what uses
the choice (``ct.init``), with a ConfigError naming the variable; a command whose reference
names its backend works (issue 15)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ckpt_track as ct
from ckpt_track.cli import app
from ckpt_track.config import load_settings


@pytest.fixture
def run_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """One checkpoint in a local store under ``tmp_path``, logged before the variable is set."""
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    run = ct.init(project="p", name="r", backend="local")
    run.log_checkpoint(5, model=torch.nn.Linear(2, 2), blocking=True)
    run.finish()
    monkeypatch.setenv("CKPT_TRACK_BACKEND", "nosuch")
    return str(run.ref)


def test_a_command_whose_reference_names_its_backend_ignores_it(run_ref: str) -> None:
    result = CliRunner().invoke(app, ["ls", run_ref])
    assert result.exit_code == 0, result.output
    assert "@step=5" in result.output or "5" in result.output
    assert ct.restore(f"{run_ref}@latest", model=torch.nn.Linear(2, 2)).step == 5


def test_loading_settings_does_not_fail_on_the_choice(run_ref: str) -> None:
    assert load_settings().backend == ("nosuch",)


def test_the_choice_is_checked_where_it_is_used_naming_the_variable(run_ref: str) -> None:
    with pytest.raises(ct.ConfigError) as info:
        load_settings().checked_backends()
    assert isinstance(info.value, ct.UnknownBackend)
    message = str(info.value)
    assert "unknown backend 'nosuch'" in message and "environment variable CKPT_TRACK_BACKEND" in message
    assert "known backends: clearml, comet, local, mlflow, wandb" in message


def test_init_fails_naming_the_variable(run_ref: str) -> None:
    with pytest.raises(ct.ConfigError, match="unknown backend 'nosuch'.*environment variable CKPT_TRACK_BACKEND"):
        ct.init(project="p")


def test_a_file_choice_is_named_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPT_TRACK_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt_track.toml").write_text('backend = ["local", "mlfow"]\n')
    settings = load_settings()
    with pytest.raises(ct.UnknownBackend, match=r"'mlfow'.*config file .*ckpt_track.toml"):
        settings.checked_backends()
    assert load_settings({"backend": "local"}).checked_backends() == ("local",)
