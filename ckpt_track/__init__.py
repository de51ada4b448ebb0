"""ckpt_track: training checkpoints as versioned, restorable records in your experiment tracker.

>>> import ckpt_track as ct
>>> run = ct.init(project="resnet")                                        # doctest: +SKIP
>>> start = run.resume(model=model, optimizer=opt)                         # doctest: +SKIP
>>> run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": vl})  # doctest: +SKIP
>>> run.finish()                                                           # doctest: +SKIP
>>> ct.restore("local://resnet/3k2j1x@best", model=model)                  # doctest: +SKIP
"""

from __future__ import annotations

from .config import Retention, Settings, load_settings
from .errors import (
    AuthError,
    BackendError,
    BackendNotInstalled,
    BackendUnavailable,
    CheckpointNotFound,
    CheckpointWriteError,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
    SerializationError,
    StateMismatch,
    StepOrderWarning,
    UnknownBackend,
)
from .protocol import Backend
from .records import Capability, ResumeMode, RunInfo, RunSpec, Stored
from .refs import Ref, parse_ref
from .run import CheckpointHandle, Run, init, list_checkpoints, log_checkpoint, restore
from .state import Restored
from .state_codec import is_storable
from .state_io import (
    CheckpointState,
    FetchedCheckpoint,
    cache_dir,
    fetch_checkpoint,
    find_checkpoint,
    is_checkpoint_dir,
    save_checkpoint,
)
from .state_rng import apply_rng, capture_rng

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Backend",
    "BackendError",
    "BackendNotInstalled",
    "BackendUnavailable",
    "Capability",
    "CheckpointHandle",
    "CheckpointNotFound",
    "CheckpointState",
    "CheckpointWriteError",
    "CkptTrackError",
    "ConfigError",
    "FetchedCheckpoint",
    "IntegrityError",
    "InvalidRef",
    "Ref",
    "Restored",
    "ResumeMode",
    "Retention",
    "Run",
    "RunInfo",
    "RunSpec",
    "SerializationError",
    "Settings",
    "StateMismatch",
    "StepOrderWarning",
    "Stored",
    "UnknownBackend",
    "apply_rng",
    "cache_dir",
    "capture_rng",
    "fetch_checkpoint",
    "find_checkpoint",
    "init",
    "is_checkpoint_dir",
    "is_storable",
    "list_checkpoints",
    "load_settings",
    "log_checkpoint",
    "parse_ref",
    "restore",
    "save_checkpoint",
]
