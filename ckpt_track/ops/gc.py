"""Retention applied to a run on any backend: delete every version that no rule keeps.

The plan comes from :func:`ckpt_track.policy.retention_reasons`, the rules training applies;
this module adds the rule precedence of an explicit call and the checks that make deleting
safe to run by hand."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import STORAGE_SECTION, Retention, Settings
from ..errors import BackendError, CkptTrackError, ConfigError
from ..external import forget
from ..objstore import GC_GRACE_S, ObjectStore, storage_options
from ..policy import PROTECTED_ALIASES, retention_reasons
from ..records import RunInfo, Stored
from ..refs import Ref
from ..resolve import Resolver
from ._common import SettingsLike, as_settings

__all__ = ["GcResult", "ObjectGcResult", "gc", "gc_objects"]


@dataclass(frozen=True)
class GcResult:
    """What retention decided for a run: ``planned`` versions to delete, ``kept`` the rest.
    ``deleted`` equals ``planned`` after a real run and is empty after a dry run.
    ``kept_by`` maps each kept version to the rules that keep it (``keep_last``, ``keep_best``,
    ``keep_every``, ``alias latest``, ``alias best``, ``alias <yours>``)."""

    run: RunInfo
    retention: Retention
    planned: tuple[Stored, ...]
    kept: tuple[Stored, ...]
    deleted: tuple[Stored, ...]
    dry_run: bool
    kept_by: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


def _retention(settings: Settings, keep_last: int | None, keep_best: int | None, keep_every: int | None,
               metric: str | None, mode: str | None) -> Retention:
    """Explicit rules replace the configured ``[retention]`` ones; metric and mode fall back
    to ``[retention]``, then to ``monitor`` / ``mode``."""
    configured = settings.retention
    explicit = any(v is not None for v in (keep_last, keep_best, keep_every))
    if mode is not None and mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    rules = (keep_last, keep_best, keep_every) if explicit else (
        configured.keep_last, configured.keep_best, configured.keep_every)
    for label, value in zip(("keep_last", "keep_best", "keep_every"), rules):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    retention = Retention(
        keep_last=rules[0], keep_best=rules[1], keep_every=rules[2],
        metric=metric or configured.metric or settings.monitor,
        mode=mode or configured.mode or settings.mode,
    )
    if not retention.enabled():
        raise ConfigError("no retention rule: give keep_last, keep_best or keep_every (--keep-last N, "
                          "--keep-best K, --keep-every S), or set them in [retention] of ckpt_track.toml")
    if retention.keep_best and not retention.metric:
        raise ConfigError("keep_best needs a metric to rank by: give --metric NAME or set monitor")
    return retention


def gc(
    ref: str | Ref,
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    keep_every: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
    dry_run: bool = False,
    settings: SettingsLike = None,
) -> GcResult:
    """Apply retention to a run on any backend: delete every version that no rule keeps.

    Never deletes a version holding ``latest``, ``best`` or a user alias.  Without any
    ``keep_*`` argument the configured ``[retention]`` rules apply; with one, only the
    given ones.  ``dry_run`` deletes nothing and returns the plan.

    >>> gc("local://p/r", keep_last=3, keep_best=1, metric="val/loss", dry_run=True).planned  # doctest: +SKIP
    """
    s = as_settings(settings)
    retention = _retention(s, keep_last, keep_best, keep_every, metric, mode)
    listing = Resolver(s).run(ref)
    backend, info, stored = listing.backend, listing.run, listing.stored
    if retention.keep_best and stored and not any(retention.metric in x.metrics for x in stored):
        # a misspelt metric would silently protect nothing
        known = sorted({m for x in stored for m in x.metrics})
        raise ConfigError(f"no checkpoint of {info.ref} records metric {retention.metric!r}, so keep_best "
                          f"cannot rank them; metrics there: {', '.join(known) or 'none'}")
    reasons = retention_reasons(stored, retention, retention.metric, retention.mode or s.mode)
    plan = [x for x in stored if not reasons[x.version]]
    protected = [x for x in plan if any(a in PROTECTED_ALIASES or not a.startswith("step-") for a in x.aliases)]
    if protected:  # policy guarantees this; deleting an aliased version is unrecoverable, so check again
        raise CkptTrackError(f"retention planned to delete aliased versions {[str(x.ref) for x in protected]}")
    doomed = {x.version for x in plan}
    kept = tuple(x for x in stored if x.version not in doomed)
    if plan and not dry_run and "delete" not in getattr(backend, "capabilities", frozenset()):
        raise BackendError(f"the {backend.name} backend cannot delete checkpoints, so gc cannot apply retention")
    deleted: list[Stored] = []
    if not dry_run:
        for x in plan:
            backend.delete(x)
            forget(x, s)  # its files in object storage, when [storage] url holds them
            deleted.append(x)
    return GcResult(info, retention, tuple(plan), kept, tuple(deleted), dry_run,
                    {x.version: reasons[x.version] for x in kept})



@dataclass(frozen=True)
class ObjectGcResult:
    """What a ``gc`` of an object-store prefix removed (or would remove, ``dry_run``)."""

    url: str
    removed: tuple[str, ...]
    size: int
    dry_run: bool


def gc_objects(url: str, *, dry_run: bool = False, grace_s: float = GC_GRACE_S,
               settings: SettingsLike = None) -> ObjectGcResult:
    """Remove the objects under an object-store prefix (``s3://bucket/prefix``) that no version
    of any run under it references: what crashed or interrupted saves left.  Objects younger
    than ``grace_s`` are kept (a save in progress uploads its objects before its manifest).

    Example: ``gc_objects("s3://ckpts/team", dry_run=True)``
    """
    s = as_settings(settings)
    store = ObjectStore(url, storage_options(s.backend_options(STORAGE_SECTION)))
    removed, size = store.collect(dry_run=dry_run, grace_s=grace_s)
    return ObjectGcResult(store.url, tuple(removed), size, dry_run)
