"""The Protocol every tracker backend implements: it moves committed checkpoint directories
and their metadata in and out of one tracker, in that tracker's native concepts.

The core decides and the backend carries out.  What the core owns (a backend calls these,
it never re-implements them):

- version numbers and the high-water mark: :func:`ckpt_track.plan.next_version`;
- which files a version must send (dedup): :func:`ckpt_track.plan.files_to_send`, and which
  a delete may remove: :func:`ckpt_track.plan.unreferenced`;
- whether ``open_run`` creates or attaches: :func:`ckpt_track.plan.resume_decision`;
- the download cache (a verified local copy is reused, only missing files are fetched):
  :func:`ckpt_track.cache.fetch`;
- option parsing with did-you-mean errors: :func:`ckpt_track.options.parse_options`;
- the SDK error boundary: :func:`ckpt_track.boundary.sdk_errors`;
- a local directory store (run.json, versions, alias table, lock): ``backends._store``.

Call order, as the core drives it (one writer per run; reads may come from any process)::

    open_run(spec) -> RunInfo                 once per process (or find_run(ref) to read)
      [sweep(run)]                            optional; before the first put of a process
      list(run) -> [Stored]                   any time
      put(run, ckpt, aliases) -> Stored       once per checkpoint, lowest step first; may be
                                              called again for a checkpoint whose put was cut
                                              short (see below)
      set_aliases(stored, aliases)            after put, to move aliases (best, user aliases)
      get(stored, dest) -> LocalCheckpoint    restore; dest is the cache entry for ``stored``
      delete(stored)                          retention and gc
      link_input(run, source)                 once, when a run resumes from ``source``
    finish_run(run)                           once, last
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from .format import LocalCheckpoint
from .records import RunInfo, RunSpec, Stored
from .refs import Ref

__all__ = ["Backend"]


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
    # - ``damaged(self, run) -> {version: (aliases, why)}`` names the versions ``list`` left out
    #   because they are damaged, so that a reference meaning one of them is refused, never
    #   answered with another version (stores that keep files on local disk).
    # - ``sweep(self, run) -> None`` removes what an upload cut short (a killed process, a
    #   failed put) left half-created in the tracker; called from the upload thread, once per
    #   process for a resumed run and after a put failed part way.  One writer per run.
    # - ``list_projects(self) -> list[str]`` names the projects (experiments) this backend can
    #   see, offline SDK directories included; behind ``ckpt-track projects``.
    # - ``list_runs(self, project) -> list[RunInfo]`` gives the runs of ``project`` that hold
    #   ckpt_track checkpoints, each as ``find_run`` returns it (so ``list(info)`` works on it);
    #   an unknown project is ``CheckpointNotFound`` naming it and listing the known ones.
    #   Behind ``ckpt-track runs``; without these two, the verbs say the backend cannot list.
    # - ``run_config(self, run) -> Mapping[str, Any] | None`` is the training config the run was
    #   opened with (``RunSpec.config``) as the tracker holds it, None when it cannot tell; the
    #   checkpoint itself records only its hash (lineage ``config_hash``).  Shown by ``show``.
    # ``put`` must be safe to call again for a checkpoint whose earlier put was cut short: the
    # core recognises one already stored by its step and ``created`` (``Stored.created`` must
    # be the manifest's), so the tracker never holds it twice.

    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        """This tracker's web-UI URLs and native references, or None."""

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        """Human-readable reference forms this backend accepts, for error messages."""
