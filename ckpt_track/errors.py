"""The ckpt_track exception tree.

Every error the library raises on purpose is a :class:`CkptTrackError`; the
subclasses also derive from the matching built-in so ``except LookupError``
style code keeps working::

    CkptTrackError
    ├── ConfigError (ValueError)
    │   └── UnknownBackend (KeyError)
    ├── InvalidRef (ValueError)
    ├── CheckpointNotFound (LookupError)
    ├── IntegrityError
    ├── StateMismatch (ValueError)
    ├── SerializationError (TypeError)
    ├── CheckpointWriteError            -- a background save failed
    ├── DistributedError                -- a collective step (torch.distributed) failed
    └── BackendError
        ├── BackendNotInstalled (ImportError)
        ├── BackendUnavailable (ConnectionError)
        └── AuthError (PermissionError)

Warnings (``warnings.warn``, filter them by category)::

    UserWarning
    └── StepOrderWarning                -- a step repeated, or below one logged earlier

A message says what was wrong and what to do about it.  Errors raised at a
backend boundary chain the tracker SDK's original exception (``raise ... from exc``).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuthError",
    "BackendError",
    "BackendNotInstalled",
    "BackendUnavailable",
    "CheckpointNotFound",
    "CheckpointWriteError",
    "CkptTrackError",
    "ConfigError",
    "DistributedError",
    "IntegrityError",
    "InvalidRef",
    "SerializationError",
    "StateMismatch",
    "StepOrderWarning",
    "UnknownBackend",
]


class CkptTrackError(Exception):
    """Base class of every error raised by ckpt_track."""


class ConfigError(CkptTrackError, ValueError):
    """A configuration value, file or keyword argument is wrong."""


class UnknownBackend(ConfigError, KeyError):
    """A backend name that no built-in backend or plugin provides."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"unknown backend {name!r}; known backends: {', '.join(self.known)}. "
            "Third-party backends register under the entry-point group 'ckpt_track.backends'."
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class InvalidRef(CkptTrackError, ValueError):
    """A checkpoint reference that cannot be parsed."""


class CheckpointNotFound(CkptTrackError, LookupError):
    """A run, step, version or alias that does not exist."""

    def __str__(self) -> str:  # LookupError subclasses like KeyError repr(); keep it plain
        return str(self.args[0]) if self.args else ""


class IntegrityError(CkptTrackError):
    """A checkpoint file is missing, truncated or does not match its manifest hash."""


class StateMismatch(CkptTrackError, ValueError):
    """Saved training state does not fit the model/optimizer it is restored into."""


class SerializationError(CkptTrackError, TypeError):
    """A value cannot be stored in a checkpoint (only JSON values and tensors can)."""


class CheckpointWriteError(CkptTrackError):
    """A checkpoint saved in the background could not be written or uploaded."""


class DistributedError(CkptTrackError):
    """A collective step under torch.distributed failed: a rank did not take part within
    ``collective_timeout``, or another rank failed (the message names the rank and why)."""


class BackendError(CkptTrackError):
    """A tracker backend failed."""


class BackendNotInstalled(BackendError, ImportError):
    """The tracker SDK a backend needs is not installed."""

    def __init__(self, backend: str, extra: str | None = None, module: str | None = None) -> None:
        self.backend = backend
        self.extra = extra or backend
        what = f" (module {module!r} is missing)" if module else ""
        super().__init__(
            f"backend {backend!r} needs its SDK{what}: pip install 'ckpt-track[{self.extra}]'"
        )


class BackendUnavailable(BackendError, ConnectionError):
    """The tracker cannot be reached or refused the request."""


class AuthError(BackendError, PermissionError):
    """Credentials for a tracker are missing or wrong."""


class StepOrderWarning(UserWarning):
    """``log_checkpoint`` was given a step the run already holds, or one below its highest:
    both versions are kept (``@step=N`` selects the newest at that step)."""
