"""Checkpoints copied between runs and trackers, and the runs a copy (or an average) writes to.

Copy targets (``to=`` of :func:`copy`, a reference output of
:func:`ckpt_track.ops.average.average`)::

    <backend>://<run ref>           an existing run, e.g. mlflow://<run_id>, local://proj/3k2j1x
    <backend>://<project>/<name>    the run with that name (or, where the backend lets us
                                    choose ids, that id) in that project, created if missing;
                                    for MLflow the project is the experiment
    ...?key=value                   backend options for the target, e.g. ?tracking_uri=http://host:5000,
                                    ?root=/data/ckpts (local), ?entity=acme (W&B)

Steps, metrics, aliases and the manifest (so lineage) travel unchanged; files are verified
before they are sent.  Into a local store on the same file system the files are hard-linked
(safe: a committed checkpoint's files are read-only and never changed in place);
``link=False`` makes every file an independent copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CheckpointNotFound, ConfigError, InvalidRef
from ..format.copy import linking
from ..policy import select
from ..protocol import Backend
from ..records import RunInfo, RunSpec, Stored
from ..refs import Ref, parse_ref
from ..resolve import Resolved, Resolver, canonical, open_backend
from ._common import SettingsLike, as_settings

__all__ = ["CopyResult", "copy", "open_target"]


def open_target(target: str | Ref, settings: SettingsLike = None) -> tuple[Backend, RunInfo]:
    """Open (attach to or create) the run a copy target names; see the module docstring
    for the grammar.  The caller calls ``backend.finish_run(run)`` when done."""
    s = as_settings(settings)
    ref = parse_ref(target)
    if ref.selector:
        raise ConfigError(f"target {ref} names a checkpoint; name a run instead (drop {ref.selector!r})")
    backend = open_backend(ref.backend, s, ref)
    canon = canonical(backend, ref)
    if canon.selector:
        raise ConfigError(f"target {ref} names a checkpoint, not a run")
    try:
        found = backend.find_run(canon)
    except (CheckpointNotFound, InvalidRef) as exc:
        segs = canon.segments
        if len(segs) != 2:
            raise ConfigError(
                f"target {ref} is not an existing run; to create one write {ref.backend}://<project>/<run name> "
                f"(for MLflow the project is the experiment) ({str(exc).splitlines()[0]})"
            ) from exc
        project, name = segs
        can_choose = "choose_run_id" in getattr(backend, "capabilities", frozenset())
        spec = RunSpec(project=project, name=name, run_id=name if can_choose else None, resume="auto")
        run = backend.open_run(spec)
        if run.project != project:
            warnings.warn(f"target {ref}: the {backend.name} settings put the run in project {run.project!r}, "
                          f"not {project!r}; add the backend's project option to the target (?key=value) to "
                          "override them", UserWarning, stacklevel=2)
        return backend, run
    return backend, backend.open_run(RunSpec(project=found.project, name=found.name, run_id=found.run_id,
                                             resume="must"))


@dataclass(frozen=True)
class CopyResult:
    """``copied`` and ``skipped`` pair each source version with its version in the target;
    a skipped one was already there (same step, creation time and size).  ``linked`` counts
    the files hard-linked rather than copied (read-only, sharing their inode with the source
    or with the target's other versions); 0 when none, always with ``link=False``."""

    source: RunInfo
    target: RunInfo
    copied: tuple[tuple[Stored, Stored], ...]
    skipped: tuple[tuple[Stored, Stored], ...]
    linked: int = 0


def _identity(s: Stored) -> tuple[int, str, int]:
    return s.step, s.created, s.size


def copy(
    ref: str | Ref,
    to: str | Ref,
    *,
    settings: SettingsLike = None,
    progress: Callable[[int, int, Stored], None] | None = None,
    link: bool = True,
) -> CopyResult:
    """Copy one checkpoint (``ref`` with a selector) or a whole run (no selector: every
    version, oldest first) into the run ``to`` names, on any backend.

    Steps, metrics, the source's aliases and the manifest (so lineage) travel unchanged;
    files are verified before they are sent.  Versions already in the target are skipped,
    so an interrupted copy can simply be run again.  ``progress(done, total, stored)`` is
    called before each source version is handled.  ``link=False``: no file of the target is
    hard-linked (each has its own inode), where a local target would otherwise link them.

    >>> copy("mlflow://0f1e2d3c4b5a69788796a5b4c3d2e1f0", "local://resnet/mirror")  # doctest: +SKIP
    """
    s = as_settings(settings)
    source = Resolver(s).run(ref)
    src_backend, src_run, src_all = source.backend, source.run, source.stored
    chosen = [select(src_all, source.ref)] if source.ref.selector else list(src_all)
    if not chosen:
        raise CheckpointNotFound(f"{src_run.ref} has no committed checkpoints to copy")
    backend, target = open_target(to, s)
    copied: list[tuple[Stored, Stored]] = []
    skipped: list[tuple[Stored, Stored]] = []
    try:
        with linking(link) as links:
            present = {_identity(x): x for x in backend.list(target)}
            for done, src in enumerate(chosen):
                if progress is not None:
                    progress(done, len(chosen), src)
                there = present.get(_identity(src))
                if there is not None:
                    if src.aliases:
                        backend.set_aliases(there, src.aliases)
                    skipped.append((src, there))
                    continue
                ckpt = Resolved(src_backend, src_run, src, s).fetch_verified()
                stored = backend.put(target, ckpt, src.aliases)
                present[_identity(stored)] = stored
                copied.append((src, stored))
    finally:
        backend.finish_run(target)
    return CopyResult(src_run, target, tuple(copied), tuple(skipped), links.linked)
