"""The local backend on an ``s3://`` root, against a real S3 server (SeaweedFS ``weed mini``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_track.backends.local import LocalBackend
from ckpt_track.testing.contract import BackendContract


class TestLocalOnS3Contract(BackendContract):
    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return ["local://p/r@step=abc", "local://p//r", "local://p/r:v0"]

    @pytest.fixture
    def backend(self, s3_root: str) -> LocalBackend:
        return LocalBackend({"root": s3_root})

    @pytest.fixture
    def settings_overrides(self, s3_root: str, tmp_path: Path) -> dict:
        return {"backend": "local", "local": {"root": s3_root}}
