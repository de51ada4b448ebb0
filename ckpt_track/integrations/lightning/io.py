"""The ``CheckpointIO`` plugin: Lightning reads ``ckpt_path`` references, and optionally
writes its checkpoint files, in the ckpt_track format, never through pickle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

import ckpt_track as ct
from ckpt_track.integrations.lightning.checkpoint import (
    EXTRA_KEY,
    UNSTORED_KEY,
    StateOf,
    is_reference,
    lightning_checkpoint,
    optimizer_state,
    scheduler_state,
    storable_checkpoint,
)

__all__ = ["CkptTrackCheckpointIO", "PathType"]

#: what Lightning passes as a checkpoint path (its own alias for it is private)
PathType = str | Path


class CkptTrackCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that reads and writes the ckpt_track format, never pickles.

    ``load_checkpoint`` accepts any ckpt_track reference (``"local://proj/run@latest"``,
    tracker URLs) or a ckpt_track checkpoint directory, and restores the global RNG states
    saved with it.  With ``fallback`` (what :class:`CkptTrackCallback` installs) every other
    path and every save goes to that IO unchanged; without, ``save_checkpoint`` writes a
    ckpt_track checkpoint directory at the path Lightning gives (``.../epoch=1-step=20.ckpt``).

    >>> trainer = L.Trainer(plugins=[CkptTrackCheckpointIO()])                    # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="local://mnist/run-1@step=300")              # doctest: +SKIP
    """

    def __init__(self, settings: ct.Settings | None = None, *, fallback: CheckpointIO | None = None,
                 restore_rng: bool = True) -> None:
        self.settings = settings
        self.fallback = fallback
        self.restore_rng = restore_rng
        self._warned: set[str] = set()

    def load_checkpoint(self, path: PathType, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # map_location and weights_only concern torch.load; nothing here unpickles and tensors
        # load on the CPU, from where Lightning moves them to the module's device
        if is_reference(path) or ct.is_checkpoint_dir(path):
            return lightning_checkpoint(str(path), settings=self.settings, rng=self.restore_rng)
        if self.fallback is not None:
            return self.fallback.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        raise ct.CheckpointNotFound(
            f"{path} is neither a ckpt_track reference nor a ckpt_track checkpoint directory; "
            "CkptTrackCheckpointIO never unpickles, so load a .ckpt file without this plugin"
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathType, storage_options: Any | None = None) -> None:
        if self.fallback is not None:
            self.fallback.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError("CkptTrackCheckpointIO.save_checkpoint takes no storage_options")
        if "://" in str(path):
            raise ct.ConfigError(f"{path}: CkptTrackCheckpointIO saves to local directories; log to a tracker "
                                 "with CkptTrackCallback instead")
        cleaned, notes = storable_checkpoint(checkpoint, self._warned)
        model = StateOf(cleaned["state_dict"]) if "state_dict" in cleaned else None
        ct.save_checkpoint(path, step=int(checkpoint.get("global_step", 0)), epoch=checkpoint.get("epoch"),
                           model=model, optimizer=optimizer_state(cleaned),  # type: ignore[arg-type]
                           scheduler=scheduler_state(cleaned), extra={EXTRA_KEY: cleaned, UNSTORED_KEY: notes})

    def remove_checkpoint(self, path: PathType) -> None:
        if self.fallback is not None and not ct.is_checkpoint_dir(path):
            self.fallback.remove_checkpoint(path)
            return
        shutil.rmtree(path, ignore_errors=True)

    def teardown(self) -> None:
        if self.fallback is not None:
            self.fallback.teardown()
