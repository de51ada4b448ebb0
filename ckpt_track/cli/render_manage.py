"""What the verbs that write or delete (``gc``, ``copy``, ``average``) print: tables, one-line
summaries and the ``--json`` documents, built with :mod:`.render`'s helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from ..ops.average import AverageResult
from ..ops.copy import CopyResult
from ..ops.gc import GcResult
from ..records import Stored
from .render import _number, _run_label, _shown_aliases, _table, human_size, ls_record

__all__ = [
    "average_record", "average_text", "copy_record", "copy_rows", "copy_summary", "copy_table", "gc_record",
    "gc_summary", "gc_table", "object_gc_record", "object_gc_summary",
]


# --------------------------------------------------------------------------- gc


def _kept_by(result: GcResult, s: Stored) -> str:
    return ", ".join(r.replace("_", "-") for r in result.kept_by.get(s.version, ()))


def gc_table(result: GcResult) -> Table:
    metric = result.retention.metric
    doomed = {s.version for s in result.planned}
    rules = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in (("keep_last", result.retention.keep_last),
                                                                 ("keep_best", result.retention.keep_best),
                                                                 ("keep_every", result.retention.keep_every)) if v)
    title = f"{_run_label(result.run)}: {rules}" + (f" by {metric} ({result.retention.mode})"
                                                    if result.retention.keep_best else "")
    table = _table(title, ("version", "step", "aliases", metric or "metric", "size", "action", "kept by"),
                   right=("version", "step", metric or "metric", "size"))
    verb = "would delete" if result.dry_run else "deleted"
    for s in sorted((*result.kept, *result.planned), key=lambda x: x.version):
        value = s.metrics.get(metric) if metric else None
        table.add_row(f"v{s.version}", str(s.step), Text(", ".join(_shown_aliases(s.aliases, False))),
                      _number(value), human_size(s.size), verb if s.version in doomed else "keep",
                      Text(_kept_by(result, s)))
    return table


def gc_record(result: GcResult) -> dict[str, Any]:
    """``keep`` records carry ``kept_by``: the rules that keep each version."""
    return {"run": str(result.run.ref), "dry_run": result.dry_run,
            "delete": [ls_record(s) for s in result.planned],
            "deleted": [ls_record(s) for s in result.deleted],
            "keep": [{**ls_record(s), "kept_by": list(result.kept_by.get(s.version, ()))} for s in result.kept]}


def gc_summary(result: GcResult) -> Text:
    """The line under the table: what was (or would be) deleted."""
    size = human_size(sum(s.size for s in result.planned))
    if not result.planned:
        return Text("nothing to delete")
    if result.dry_run:
        return Text(f"dry run: would delete {len(result.planned)} of {len(result.planned) + len(result.kept)}"
                    f" checkpoints ({size}); run without --dry-run to delete them")
    return Text(f"deleted {len(result.deleted)} checkpoints ({size}); kept {len(result.kept)}")


def object_gc_record(result: Any) -> dict[str, Any]:
    return {"url": result.url, "dry_run": result.dry_run, "objects": list(result.removed), "bytes": result.size}


def object_gc_summary(result: Any) -> Text:
    """What a gc of an object-store prefix removed (or would remove)."""
    if not result.removed:
        return Text(f"{result.url}: no unreferenced objects")
    size = human_size(result.size)
    if result.dry_run:
        return Text(f"dry run: would remove {len(result.removed)} unreferenced objects ({size}) under {result.url}; "
                    "run without --dry-run to remove them")
    return Text(f"removed {len(result.removed)} unreferenced objects ({size}) under {result.url}")


# --------------------------------------------------------------------------- copy


CopyRow = tuple[Stored, Stored, str]


def copy_rows(result: CopyResult) -> list[CopyRow]:
    """(source, target, status) per source version, oldest first."""
    rows = [(src, dst, "copied") for src, dst in result.copied] + [(src, dst, "already there")
                                                                   for src, dst in result.skipped]
    rows.sort(key=lambda r: r[0].version)
    return rows


def copy_record(result: CopyResult, rows: Sequence[CopyRow]) -> dict[str, Any]:
    return {"source": str(result.source.ref), "target": str(result.target.ref), "linked": result.linked,
            "copied": [{"from": str(a.ref), "to": str(b.ref), "step": a.step, "aliases": list(a.aliases),
                        "status": status} for a, b, status in rows]}


def copy_table(result: CopyResult, rows: Sequence[CopyRow]) -> Table:
    table = _table(f"{_run_label(result.source)} -> {_run_label(result.target)}",
                   ("step", "aliases", "from", "to", "status"), right=("step",), no_wrap=("from", "to"))
    for src, dst, status in rows:
        table.add_row(str(src.step), Text(", ".join(_shown_aliases(src.aliases, False))), Text(str(src.ref)),
                      Text(str(dst.ref)), status)
    return table


def copy_summary(result: CopyResult) -> Text:
    """The line under the table, saying whether files were hard-linked or copied."""
    files = (f"; {result.linked} files hard-linked (read-only, sharing inodes with the source or the target's other versions; "
             "--no-link makes independent copies)" if result.linked else
             "; files copied (independent of the source)" if result.copied else "")
    return Text(f"copied {len(result.copied)}, already there {len(result.skipped)}, into {result.target.ref}{files}")


# --------------------------------------------------------------------------- average


def average_record(result: AverageResult) -> dict[str, Any]:
    return {"sources": list(result.sources), "step": result.step, "path": None if result.path is None
            else str(result.path), "ref": None if result.stored is None else str(result.stored.ref),
            "averaged": list(result.averaged), "taken_from_first": list(result.taken)}


def average_text(result: AverageResult) -> Text:
    where = str(result.path) if result.path is not None else str(result.stored.ref) if result.stored else ""
    return Text(
        f"averaged {len(result.sources)} checkpoints ({len(result.averaged)} tensors"
        + (f"; {len(result.taken)} non-float taken from the first" if result.taken else "")
        + f") into {where} at step {result.step}"
    )
