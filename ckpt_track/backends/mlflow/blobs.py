"""The content-addressed tensor files of a run (``t-<digest>.safetensors``), kept once per run
in the run's artifacts under ``ckpt_track/blobs/`` instead of in each LoggedModel.

What to send and what a delete may remove is decided by :mod:`ckpt_track.plan`; this module
lists, uploads, downloads and deletes the files in MLflow's artifact store, and remembers
which files each model's manifest names (a manifest never changes once logged).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import IntegrityError
from ...format import MANIFEST, Manifest, is_blob, read_manifest
from ...plan import unreferenced
from .client import MlflowSdk
from .handles import BLOBS

__all__ = ["RunBlobs"]

_PARALLEL = 8  # downloads at a time
_SCRATCH = ".ckpt_track-blobs"  # where the SDK writes a file (under its artifact path) before it is moved


class RunBlobs:
    """The shared tensor files of the runs one backend writes to and reads from."""

    def __init__(self, sdk: MlflowSdk) -> None:
        self.sdk = sdk
        self._named: dict[str, frozenset[str]] = {}  # model id -> blob files its manifest names

    @staticmethod
    def held(run_repo: Any) -> dict[str, int | None]:
        """Blob file name -> size, of the blobs the run holds (one listing call)."""
        return {posixpath.basename(f.path): f.file_size for f in run_repo.list_artifacts(BLOBS) if not f.is_dir}

    @staticmethod
    def send(run_repo: Any, src: Path, names: Iterable[str]) -> None:
        """Upload the named files of the checkpoint directory ``src`` into the run's blobs (before
        the model's manifest: a manifest never names a file that is not there)."""
        for fname in names:
            run_repo.log_artifact(str(src / fname), BLOBS)

    def remember(self, model_id: str, manifest: Manifest) -> None:
        self._named[model_id] = frozenset(f for f in manifest.files if is_blob(f))

    def forget(self, model_id: str) -> None:
        self._named.pop(model_id, None)

    def named(self, model: Any) -> frozenset[str]:
        """The blob files a model's manifest names (cached: a model's manifest never changes)."""
        if model.model_id not in self._named:
            with tempfile.TemporaryDirectory(prefix="ckpt_track-manifest-") as tmp:
                try:
                    self.sdk.repo(model.artifact_location).download_artifacts(MANIFEST, dst_path=tmp)
                except Exception:
                    if str(model.status).endswith("READY"):
                        raise
                    return frozenset()  # still uploading, its manifest not there yet: it names nothing
                self.remember(model.model_id, read_manifest(Path(tmp)))
        return self._named[model.model_id]

    def sweep(self, run_repo: Any, remaining: Callable[[], Sequence[Any]]) -> None:
        """Delete the run's blobs that none of the ``remaining()`` models names (asked for only
        when the run holds any)."""
        held = self.held(run_repo)
        if not held:
            return
        for fname in unreferenced(held, (self.named(m) for m in remaining())):
            run_repo.delete_artifacts(f"{BLOBS}/{fname}")

    def download(self, run_repo: Any, names: Sequence[str], into: Path, *, what: str, run_id: str) -> None:
        """Download the named blobs of the run into the directory ``into``, a few at a time."""
        if not names:
            return
        gone = sorted(set(names) - set(self.held(run_repo)))
        if gone:
            raise IntegrityError(
                f"{what}: tensor file(s) {', '.join(gone)} are missing from "
                f"{BLOBS}/ in the artifacts of MLflow run {run_id}"
            )
        scratch = into / _SCRATCH
        scratch.mkdir()

        def fetch(fname: str) -> None:
            run_repo.download_artifacts(f"{BLOBS}/{fname}", dst_path=str(scratch))
            os.replace(scratch / BLOBS / fname, into / fname)

        with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(names))) as pool:
            list(pool.map(fetch, names))
        shutil.rmtree(scratch)
