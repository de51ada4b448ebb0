"""Object-store pieces that need no server: URL recognition, [storage] options, progress bars,
a ``file://`` root, and the layout's reserved names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ckpt_track import progress
from ckpt_track.backends.local import LocalBackend
from ckpt_track.errors import ConfigError
from ckpt_track.objstore import ObjectProjects, ObjectStore, is_url, storage_options
from ckpt_track.records import RunSpec


def test_urls_and_paths() -> None:
    assert is_url("s3://b/p") and is_url("gs://b") and is_url("az://c/p") and is_url("memory://x")
    assert not is_url("/data/ckpts") and not is_url("file:///data") and not is_url("C://x") and not is_url("ckpt_runs")


def test_storage_options_are_coerced_and_typo_checked_by_config() -> None:
    opts = storage_options({"url": "s3://b", "replicas": ["file:///x"], "anon": "true", "region": "eu-west-1",
                            "max_concurrency": "4", "options": {"use_listings_cache": False}})
    assert opts == {"anon": True, "max_concurrency": 4, "client_kwargs": {"region_name": "eu-west-1"},
                    "use_listings_cache": False}
    import ckpt_track as ct

    with pytest.raises(ConfigError, match="endpoint_url"):
        ct.load_settings({"storage": {"endpoint_ur": "http://x"}})
    with pytest.raises(ConfigError, match="part_size"):
        ObjectStore("s3://b/p", {"endpoint_url": "http://127.0.0.1:9"}, part_size="1MiB")


def test_a_file_url_root_is_a_local_directory(tmp_path: Path) -> None:
    be = LocalBackend({"root": f"file://{tmp_path / 'store'}"})
    assert not be.remote and be.root == tmp_path / "store"
    be.open_run(RunSpec(project="p"))
    assert (tmp_path / "store" / "p").is_dir()


def test_reserved_project_names_in_an_object_store() -> None:
    projects = ObjectProjects(ObjectStore("memory://ckpt-units"))
    with pytest.raises(ConfigError, match="reserved"):
        projects.run("objects", "r1")


def test_progress_bar_only_on_a_terminal_for_large_transfers(monkeypatch) -> None:
    from fsspec.callbacks import NoOpCallback

    with progress.transfer_callback("small", 10) as cb:
        assert isinstance(cb, NoOpCallback)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    with progress.transfer_callback("upload", progress.MIN_BAR_BYTES) as cb:
        child = cb.branched("a", "b")
        child.set_size(5)
        child.relative_update(progress.MIN_BAR_BYTES)  # bytes of one file reach the bar
        assert not isinstance(cb, NoOpCallback)
