from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own working directory with no ckpt_track settings from outside."""
    for key in list(os.environ):
        if key.startswith("CKPT_TRACK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    import ckpt_track.run as run_mod

    if run_mod._active is not None:
        run_mod._active.finish()
