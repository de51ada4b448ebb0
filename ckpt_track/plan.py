"""What the core decides for every backend: version numbers, which files a version must send
(dedup), which a delete may remove, and whether ``open_run`` creates a run or attaches to one.

Backends call these and carry out the result in their tracker; none re-implements them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from .errors import CheckpointNotFound, ConfigError
from .format import Manifest, is_blob
from .records import RunSpec

__all__ = ["NAME", "AliasTable", "by_name", "check_segment", "describe_runs", "files_to_send", "newest_named",
           "next_version", "resume_decision", "unreferenced"]

Decision = Literal["attach", "create"]

#: a project name or run id in a store's layout (a path segment on disk or in a bucket)
NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_segment(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ConfigError(f"{what} {value!r} may only hold letters, digits, '_', '.', '-'")
    return value


def newest_named(runs: Sequence[tuple[str, Mapping[str, Any]]], name: str) -> str | None:
    """The id of the newest of ``runs`` (``(run_id, run.json)``, oldest first) called ``name``."""
    matches = [rid for rid, meta in runs if meta.get("name") == name]
    return matches[-1] if matches else None


def describe_runs(runs: Sequence[tuple[str, Mapping[str, Any]]], limit: int = 10) -> str:
    """The newest ``runs`` as ``id (name)``, for not-found messages."""
    return ", ".join(f"{rid} ({meta.get('name', rid)})" for rid, meta in runs[-limit:]) or "none"


def next_version(versions: Iterable[int], high_water: int = 0) -> int:
    """The number of the next version: one above every existing version and above the run's
    high-water mark, so a deleted newest version's number is never reused."""
    return max([*versions, int(high_water)], default=0) + 1


def files_to_send(manifest: Manifest, held: Mapping[str, int | None]) -> list[str]:
    """The files of ``manifest`` a put must send, in manifest order: every file that is not
    content-addressed, and each content-addressed one (:func:`ckpt_track.format.is_blob`) the
    run does not hold yet at that size (``held``: file name -> size; a file whose size the
    tracker does not report is sent again: a partial upload must never be taken as held)."""
    return [f for f, e in manifest.files.items() if not is_blob(f) or held.get(f) != e.size]


def unreferenced(held: Iterable[str], still_named: Iterable[Iterable[str]]) -> list[str]:
    """The content-addressed files of ``held`` no remaining version names: what a delete may
    remove (a file another version still needs is always kept)."""
    needed: set[str] = set()
    for names in still_named:
        needed.update(names)
    return sorted(set(held) - needed)


def resume_decision(spec: RunSpec, exists: bool, *, what: str, missing: Callable[[], str]) -> Decision:
    """Whether ``open_run`` attaches to the run ``spec`` names (``exists``: the tracker has it)
    or creates one, per ``spec.resume``; the same rules and wording for every tracker.

    ``what`` names the run as the tracker calls it (``"MLflow run 3f2a..."``); ``missing()``
    builds the not-found message for ``resume='must'`` (where it looked, what is there)."""
    if exists:
        if spec.resume == "never":
            raise ConfigError(f"{what} already exists and resume='never'; pass resume='auto' to continue it, "
                              "or another run_id")
        return "attach"
    if spec.resume == "must":
        if spec.run_id is None and spec.name is None:
            raise ConfigError("resume='must' needs run_id= or name= to know which run to continue")
        raise CheckpointNotFound(missing())
    return "create"


def by_name(spec: RunSpec) -> bool:
    """Whether ``open_run`` should look an existing run up by ``spec.name`` (no id given, and
    the user did not ask for a new run)."""
    return spec.run_id is None and spec.name is not None and spec.resume != "never"


class AliasTable:
    """The alias table of a tracker without native aliases (``{"best": 3, "latest": 4}``): each
    alias names one version, and pointing it at another version moves it."""

    def __init__(self, table: Mapping[str, int] | None = None) -> None:
        self._table = {str(k): int(v) for k, v in (table or {}).items()}

    def point(self, aliases: Iterable[str], version: int) -> AliasTable:
        return AliasTable({**self._table, **dict.fromkeys(aliases, version)})

    def without(self, version: int) -> AliasTable:
        return AliasTable({a: v for a, v in self._table.items() if v != version})

    def of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(a for a, v in self._table.items() if v == version))

    def as_dict(self) -> dict[str, int]:
        return dict(self._table)
