"""The small Protocol every tracker backend implements, and the records it exchanges.

A backend only moves committed checkpoint directories and their metadata in and
out of one tracker.  Everything the trackers have in common (state capture, the
format, hashing, async writes, alias and retention decisions, lineage) lives in
the core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from ..errors import CkptTrackError
from ..format import LocalCheckpoint
from ..refs import Ref

__all__ = ["Backend", "RunInfo", "RunSpec", "Stored", "ResumeMode", "sdk_errors"]

ResumeMode = Literal["auto", "never", "must"]


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
    native: Mapping[str, Any] = field(default_factory=dict)  # backend-private handles


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
    native: Mapping[str, Any] = field(default_factory=dict)
    # bytes this ``put`` sent to the tracker (None when unknown, or not from a put): files the
    # run already holds (content-addressed tensor files, :func:`ckpt_track.format.is_blob`)
    # are not sent again by backends with the "dedup" capability
    uploaded: int | None = None


@runtime_checkable
class Backend(Protocol):
    """A tracker backend.  Construct with the backend's config section as ``options``.

    ``capabilities`` advertises optional behaviour to the contract tests
    (e.g. ``"delete"``, ``"concurrent_writers"``, ``"dedup"``), so tests never branch on names.

    ``"dedup"``: ``put`` sends a content-addressed tensor file (``format.is_blob``) only when
    the run does not hold it yet, ``get`` still returns the whole checkpoint, and ``delete``
    never removes a file another stored checkpoint still needs.
    """

    name: ClassVar[str]
    options: ClassVar[frozenset[str]]
    capabilities: ClassVar[frozenset[str]]

    def open_run(self, spec: RunSpec) -> RunInfo:
        """Create a run, or attach to an existing one per ``spec.resume``."""

    def find_run(self, ref: Ref) -> RunInfo:
        """The existing run a reference points into; ``CheckpointNotFound`` if none."""

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        """Store one committed checkpoint as a new version with its metrics, aliases and lineage."""

    def list(self, run: RunInfo) -> list[Stored]:
        """Every committed checkpoint of a run, oldest version first."""

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        """Make the checkpoint available on local disk (under ``dest`` or in place)."""

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        """Point each alias at ``stored``, moving it off any other version."""

    def delete(self, stored: Stored) -> None:
        """Remove one checkpoint version and its files."""

    def link_input(self, run: RunInfo, source: Stored) -> None:
        """Record in the tracker that ``run`` continues from ``source`` (a checkpoint of this
        same backend), using the tracker's own lineage concept; a no-op where it has none."""

    def finish_run(self, run: RunInfo) -> None:
        """Close the run in the tracker (flush, mark finished); called once by ``Run.finish``."""

    # Optional hooks, called by the core when a backend defines them:
    # - ``resolve_ref(self, ref) -> Ref`` turns a reference to a tracker object that is not a
    #   run (a logged model, a registry version) into ``<run>:vN``; called before ``find_run``.
    # - ``check_configured(self) -> None`` raises ConfigError before a reference is resolved
    #   when the backend would otherwise fall back to a default that has side effects (a store
    #   created in the working directory, a vendor's public host).
    # - ``sweep(self, run) -> None`` removes what an upload cut short (a killed process, a
    #   failed put) left half-created in the tracker; called from the upload thread, once per
    #   process for a resumed run and after a put failed part way.  One writer per run.
    # ``put`` must be safe to call again for a checkpoint whose earlier put was cut short: the
    # core recognises one already stored by its step and ``created`` (``Stored.created`` must
    # be the manifest's), so the tracker never holds it twice.

    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        """This tracker's web-UI URLs and native references, or None."""

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        """Human-readable reference forms this backend accepts, for error messages."""


@contextmanager
def sdk_errors(translate: Callable[[Exception, str], CkptTrackError], what: str) -> Iterator[None]:
    """The boundary of a tracker SDK: ckpt_track errors pass, anything else becomes
    ``translate(exc, what)``, chained to the original."""
    try:
        yield
    except CkptTrackError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc
