"""The plugin example of ``backends/README.md`` (``examples/plugin_backend/``) is a complete
backend: it runs the whole contract suite, is found through the registry like an installed
plugin, and the README shows exactly the code that is tested here."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ckpt_track.backends import registry
from ckpt_track.testing.contract import BackendContract

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugin_backend"
MAX_LINES = 250


@pytest.fixture(autouse=True)
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """What installing the plugin's entry point does: the registry knows ``tiny``."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setitem(registry.BUILTIN, "tiny", registry.BackendSpec("tiny", "ckpt_track_tiny:TinyBackend"))


class TestTinyPluginContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        return registry.create("tiny", {"root": str(tmp_path / "tracker")})

    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict:
        return {"backend": "tiny", "tiny": {"root": str(tmp_path / "tracker")}}

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return ["tiny://r@step=x", "tiny://r:v0", "tiny:/r"]


def test_the_example_is_one_small_file() -> None:
    lines = (EXAMPLE / "ckpt_track_tiny.py").read_text().splitlines()
    assert len(lines) <= MAX_LINES, len(lines)


def test_readme_shows_the_tested_code() -> None:
    readme = (ROOT / "backends" / "README.md").read_text()
    blocks = re.findall(r"```python\n# examples/plugin_backend/(\S+)\n(.*?)```", readme, re.DOTALL)
    shown = {name: body for name, body in blocks}
    assert set(shown) == {"ckpt_track_tiny.py"}
    assert shown["ckpt_track_tiny.py"] == (EXAMPLE / "ckpt_track_tiny.py").read_text()


def test_unknown_option_names_the_known_ones() -> None:
    from ckpt_track.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rot'\].*Did you mean 'root'"):
        registry.create("tiny", {"rot": "x"})


def test_tracker_errors_become_ckpt_track_errors(tmp_path: Path) -> None:
    import ckpt_track as ct

    be = registry.create("tiny", {"root": str(tmp_path / "tracker")})
    (tmp_path / "tracker" / "runs").mkdir(parents=True)
    with pytest.raises(ct.CheckpointNotFound, match="run nosuch not found"):
        be.find_run(ct.Ref("tiny", "nosuch"))
    assert "tinytracker" in sys.modules  # the SDK was imported on first use
