"""The records the core and the backends exchange: what a user asked for (``RunSpec``), a
run as a tracker knows it (``RunInfo``), one stored checkpoint version (``Stored``), and the
optional behaviours a backend can advertise (``Capability``).

They live in the core, not in ``backends``, so that no core module imports a backend.  Each
backend keeps what it needs to find its own objects again in ``native``: a frozen dataclass of
its own (e.g. MLflow's model id and artifact location), never read outside that backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from .refs import Ref

__all__ = ["Capability", "ResumeMode", "RunInfo", "RunSpec", "Stored"]

ResumeMode = Literal["auto", "never", "must"]


class Capability(str, Enum):
    """Optional behaviour a backend advertises in ``capabilities`` (tests never branch on names).

    Members compare equal to their string values, so ``"dedup" in backend.capabilities`` holds
    for a backend that lists ``Capability.DEDUP`` (plugins may keep plain strings)."""

    DELETE = "delete"  # ``delete`` removes a version and its files
    DEDUP = "dedup"  # a content-addressed tensor file is sent once per run; delete keeps shared ones
    REGISTRY = "registry"  # versions can also be registered in the tracker's model registry
    CHOOSE_RUN_ID = "choose_run_id"  # ``open_run`` honours ``RunSpec.run_id`` for a new run
    CONCURRENT_WRITERS = "concurrent_writers"  # several processes may put into one run at once

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RunSpec:
    """What the user asked for in ``ct.init``."""

    project: str
    name: str | None = None
    run_id: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # the training config (hyper-parameters)
    resume: ResumeMode = "auto"


@dataclass(frozen=True)
class RunInfo:
    """A run as the tracker knows it."""

    backend: str
    project: str
    run_id: str
    name: str
    ref: Ref  # the run's reference, without a selector
    resumed: bool = False  # attached to a run that already existed
    native: Any = None  # the backend's own frozen handle (read by that backend only)


@dataclass(frozen=True)
class Stored:
    """One checkpoint version as stored in a tracker."""

    ref: Ref  # canonical, selecting this exact version
    run: RunInfo
    version: int
    step: int
    epoch: int | None = None
    aliases: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    size: int = 0
    created: str = ""
    lineage: Mapping[str, Any] = field(default_factory=dict)
    native: Any = None  # the backend's own frozen handle (read by that backend only)
    # bytes this ``put`` sent to the tracker (None when unknown, or not from a put): files the
    # run already holds (content-addressed tensor files, :func:`ckpt_track.format.is_blob`)
    # are not sent again by backends with the "dedup" capability
    uploaded: int | None = None
