"""The two ways the Comet backend works, chosen once from ``[comet] online``:
:class:`~.online.OnlineMode` (``Experiment`` writes, the REST ``API`` reads) and
:class:`~.offline.OfflineMode` (``OfflineExperiment`` writes ``<key>.zip``, a local store
answers reads).  :class:`~.backend.CometBackend` maps the Protocol onto one of them; what is
the same in both (experiments, logging a checkpoint, references) stays in the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ...format import LocalCheckpoint
from ...records import RunInfo, Stored
from .handles import Found
from .model_registry import ModelRegistry

__all__ = ["Mode"]


class Mode(ABC):
    """Where a Comet run's checkpoints are read back from, and what ``put`` does around logging."""

    online: ClassVar[bool]  # which kind of experiment this mode can log into (see CometBackend._adopt)

    def __init__(self) -> None:
        # blob -> size of the content-addressed files each experiment holds (online: on the
        # server; offline: in this session's zip, which must be uploadable on its own)
        self.held: dict[str, dict[str, int]] = {}

    def new_session(self, key: str, create: bool) -> None:
        """This process (re)started experiment ``key``: a new experiment holds no blob yet; an
        existing one is asked again (offline: a new session writes a new zip)."""
        self.held.pop(key, None)
        if create:
            self.held[key] = {}

    # -- experiments ------------------------------------------------------------------------
    def ready(self) -> None:
        """Fail before anything starts when this mode cannot work (online: no API key)."""

    @abstractmethod
    def by_key(self, key: str) -> Found | None:
        """The experiment ``key``, or None."""

    @abstractmethod
    def by_name(self, project: str, name: str, workspace: str | None = None) -> Found | None:
        """The newest experiment of ``project`` called ``name``, or None."""

    @abstractmethod
    def not_found(self, wanted: str, project: str | None) -> str:
        """The message when no experiment ``wanted`` exists: where this mode looked."""

    @abstractmethod
    def experiment(self, comet_ml: Any, found: Found, create: bool) -> Any:
        """A live comet_ml experiment for ``found``: a new one, or ``found`` continued."""

    def published(self, exp: Any) -> None:
        """A new experiment's name, tag and parameters are logged."""

    def record_run(self, found: Found, config: Mapping[str, Any] | None) -> None:
        """Keep what finding ``found`` again needs, if this mode keeps anything."""

    def resolve(self, found: Found) -> Found:
        """``found`` with what its reference needs filled in."""
        return found

    def leave(self, exp: Any) -> None:
        """The user's own experiment, at ``finish_run``: it is theirs to end."""

    @abstractmethod
    def log_other(self, exp: Any | None, key: str, name: str, value: str) -> None:
        """Set an experiment other (``exp``: the live experiment, None once it ended)."""

    @abstractmethod
    def registry(self) -> ModelRegistry:
        """The model registry, or a ``BackendError`` where it cannot be read."""

    @abstractmethod
    def registry_version(self, name: str) -> str | None:
        """The version a new checkpoint registers as (None: Comet decides later)."""

    # -- checkpoints --------------------------------------------------------------------------
    @abstractmethod
    def put(self, run: RunInfo, exp: Any, ckpt: LocalCheckpoint, aliases: Sequence[str],
            register_as: str | None) -> Stored:
        """Log ``ckpt`` as the next version into the live ``exp`` and keep it readable."""

    @abstractmethod
    def list(self, run: RunInfo) -> list[Stored]:
        """Every complete, not deleted checkpoint of an experiment, oldest first."""

    def damaged(self, run: RunInfo) -> dict[int, tuple[tuple[str, ...], str]]:
        """Versions left out of :meth:`list` because their local copy is damaged."""
        return {}

    @abstractmethod
    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        """The checkpoint on local disk."""

    @abstractmethod
    def set_aliases(self, stored: Stored, exp: Any | None, aliases: Sequence[str]) -> None:
        """Point ``aliases`` at ``stored``."""

    @abstractmethod
    def delete(self, stored: Stored, exp: Any | None) -> None:
        """Tombstone ``stored`` first (never listed again), then remove what it alone holds."""

    def link_input(self, run: RunInfo, source: Stored) -> None:
        """Besides the ``ckpt_track.resumed_from`` other: record that ``run`` continues ``source``."""
