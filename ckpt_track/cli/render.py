"""Everything the ``ckpt-track`` verbs print: tables, trees, panels, one-line summaries and
the ``--json`` documents.

The verbs (:mod:`.inspect`, :mod:`.manage`) call the library, then hand its results here, so
what a user reads is decided in one place and stays the same whichever verb shows it.
Tables go to stdout; progress bars and spinners to stderr (:func:`err_console`), so ``--json``
output stays clean.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import typer
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ..format import LocalCheckpoint, Manifest
from ..ops.diff import CheckpointDiff, TensorDelta
from ..ops.lineage import LineageNode
from ..records import RunInfo, Stored
from ..resolve import Resolved

__all__ = [
    "RunRow", "diff_renderable", "err_console", "human_size", "lineage_tree", "ls_record", "ls_table", "out_console",
    "print_json", "project_record", "projects_table", "run_record", "runs_table", "show_record", "show_renderable",
    "spinner",
]

# Wide enough that piped tables keep whole refs and hashes (greppable); a terminal uses its own width.
_PIPE_WIDTH = 250


# --------------------------------------------------------------------------- consoles, JSON, units


def out_console() -> Console:
    """A console on the current ``sys.stdout`` (test runners swap it per call)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    return console


def err_console() -> Console:
    """Progress bars and spinners go here, so ``--json`` output on stdout stays clean."""
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(_strict_json(data), indent=2))


def _strict_json(value: Any) -> Any:
    """NaN/inf become null: Python's bare ``NaN`` would break ``jq`` and most JSON parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def human_size(nbytes: int) -> str:
    """``512 B``, ``30.0 KiB``, ``1.5 GiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _when(created: str) -> str:
    """An ISO timestamp shortened to UTC seconds; unparsable values pass through."""
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return created
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _metric(value: float) -> str:
    return f"{value:.6g}"


def _shown_aliases(aliases: Sequence[str], all_aliases: bool) -> list[str]:
    # every version carries a step-N alias; it repeats the step column
    return [a for a in aliases if all_aliases or not a.startswith("step-")]


@contextlib.contextmanager
def spinner(console: Console, message: str, enabled: bool) -> Iterator[None]:
    """A spinner on a terminal only: in a pipe or a CI log its frames would be noise."""
    if enabled and console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def _table(title: str, columns: Sequence[str], right: Sequence[str] = (), no_wrap: Sequence[str] = ()) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", no_wrap=name in no_wrap)
    return table


def _key_values(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def _aliases_text(aliases: Sequence[str]) -> str:
    shown = _shown_aliases(aliases, all_aliases=False)
    return f"[{', '.join(shown)}]" if shown else ""


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={_metric(v)}" for k, v in sorted(metrics.items()))


def _run_label(run: RunInfo) -> str:
    return str(run.ref) + ("" if run.name == run.run_id else f" ({run.name})")


def _number(value: float | None) -> str:
    return "-" if value is None else _metric(value)



# --------------------------------------------------------------------------- projects, runs


def project_record(backend: str, project: str) -> dict[str, Any]:
    """``ref`` is the argument of ``ckpt-track runs`` for this project."""
    return {"backend": backend, "project": project, "ref": f"{backend}://{project}"}


def projects_table(backend: str, projects: Sequence[str]) -> Table | Text:
    if not projects:
        return Text(f"the {backend} backend sees no projects yet")
    table = _table(f"projects of {backend}", ("project", "list its runs with"), no_wrap=("list its runs with",))
    for name in projects:
        table.add_row(Text(name), Text(f"ckpt-track runs {backend}://{name}"))
    return table


@dataclass(frozen=True)
class RunRow:
    """A run with its checkpoints (oldest version first), as ``ckpt-track runs`` lists it."""

    run: RunInfo
    stored: tuple[Stored, ...]

    @property
    def best(self) -> Stored | None:
        return next((s for s in reversed(self.stored) if "best" in s.aliases), None)


def _best_metric(best: Stored, monitor: str | None) -> tuple[str | None, float | None]:
    """The monitored metric of the best version; its only metric when the monitor is not among them."""
    if monitor is not None and monitor in best.metrics:
        return monitor, best.metrics[monitor]
    if len(best.metrics) == 1:
        ((name, value),) = best.metrics.items()
        return name, value
    return None, None


def run_record(row: RunRow, monitor: str | None) -> dict[str, Any]:
    """One run of ``ckpt-track runs --json``; ``best`` is null when no version holds ``best``."""
    best = row.best
    best_json = None
    if best is not None:
        name, value = _best_metric(best, monitor)
        best_json = {"ref": str(best.ref), "step": best.step, "metric": name, "value": value}
    return {
        "ref": str(row.run.ref), "backend": row.run.backend, "project": row.run.project, "id": row.run.run_id,
        "name": row.run.name, "created": row.stored[0].created if row.stored else None,
        "last_step": max((s.step for s in row.stored), default=None), "checkpoints": len(row.stored),
        "best": best_json,
    }


def runs_table(title: str, rows: Sequence[RunRow], monitor: str | None) -> Table | Text:
    if not rows:
        return Text(f"{title} has no runs yet")
    table = _table(f"runs of {title}", ("name", "id", "created", "last step", "best", "checkpoints", "ref"),
                   right=("last step", "checkpoints"), no_wrap=("ref",))
    for row in rows:
        record = run_record(row, monitor)
        best = record["best"]
        best_text = "-" if best is None else (f"{best['metric']}={_metric(best['value'])} (step {best['step']})"
                                              if best["metric"] is not None else f"step {best['step']}")
        table.add_row(Text(row.run.name), Text(row.run.run_id), _when(record["created"] or "") or "-",
                      "-" if record["last_step"] is None else str(record["last_step"]), Text(best_text),
                      str(record["checkpoints"]), Text(record["ref"]))
    return table


# --------------------------------------------------------------------------- ls


def ls_record(s: Stored) -> dict[str, Any]:
    return {
        "ref": str(s.ref),
        "version": s.version,
        "step": s.step,
        "epoch": s.epoch,
        "aliases": list(s.aliases),
        "metrics": dict(s.metrics),
        "size": s.size,
        "created": s.created,
    }


def ls_table(run: RunInfo, stored: Sequence[Stored], all_aliases: bool) -> Table:
    metric_names = sorted({name for s in stored for name in s.metrics})
    title = str(run.ref) if run.name == run.run_id else f"{run.ref} ({run.name})"
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("version", justify="right")
    table.add_column("step", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("aliases")
    for name in metric_names:
        table.add_column(name, justify="right")
    table.add_column("size", justify="right")
    table.add_column("created")
    table.add_column("ref", no_wrap=True)
    for s in stored:
        table.add_row(
            f"v{s.version}",
            str(s.step),
            "" if s.epoch is None else str(s.epoch),
            Text(", ".join(_shown_aliases(s.aliases, all_aliases))),
            *(_metric(s.metrics[n]) if n in s.metrics else "" for n in metric_names),
            human_size(s.size),
            _when(s.created),
            Text(str(s.ref)),
        )
    return table



# --------------------------------------------------------------------------- show


def _git(value: Any) -> str:
    if isinstance(value, Mapping):
        commit = str(value.get("commit") or "?")
        return commit + (" (dirty)" if value.get("dirty") else "")
    return "not recorded" if value is None else str(value)


def _versions(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
    return str(value)



_LINEAGE_ORDER = ("run", "parent", "resumed_from", "git", "config_hash", "host", "versions")


def _lineage_rows(lineage: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    # known keys first in a fixed order; anything newer still shows up after them
    for key in (*_LINEAGE_ORDER, *sorted(set(lineage) - set(_LINEAGE_ORDER))):
        if key not in lineage:
            continue
        value = lineage[key]
        if key == "git":
            text = _git(value)
        elif key == "versions":
            text = _versions(value)
        elif value is None:
            text = "-"
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value, sort_keys=True, default=str)
        rows.append((key, text))
    return rows


def _flat(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested config as dotted keys, as trackers show hyper-parameters: ``optimizer.lr  0.001``."""
    rows: list[tuple[str, str]] = []
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value if isinstance(value, str)
                         else json.dumps(value, sort_keys=True, default=str)))
    return rows


def _config_panel(found: Resolved, m: Manifest, config: Mapping[str, Any] | None) -> Panel | Text:
    if config:
        return Panel(_key_values(_flat(config)), title="config", title_align="left", expand=False)
    if config is not None:
        return Text("config: none (the run was started without config=...)")
    digest = m.lineage.get("config_hash")
    held = f" (config_hash {digest})" if digest else ""
    where = "a checkpoint directory" if found.backend.name == "dir" else f"the {found.backend.name} backend"
    return Text(f"config: not available from {where}; the checkpoint records only the config's hash{held}")


def show_renderable(found: Resolved, ckpt: LocalCheckpoint, config: Mapping[str, Any] | None = None) -> Group:
    s, m = found.stored, ckpt.manifest
    summary = _key_values([
        ("ref", str(s.ref)),
        ("run", str(found.run.ref) + ("" if found.run.name == found.run.run_id else f" ({found.run.name})")),
        ("version", f"v{s.version}"),
        ("step", str(m.step)),
        ("epoch", "-" if m.epoch is None else str(m.epoch)),
        ("aliases", ", ".join(s.aliases) or "-"),
        ("size", f"{human_size(m.size)} ({m.size} bytes in {len(m.files)} files)"),
        ("created", m.created),
        ("path", str(ckpt.path)),
    ])
    parts: list[Any] = [Panel(summary, title="checkpoint", title_align="left", expand=False)]
    if m.metrics:
        metrics = _key_values([(k, _metric(v)) for k, v in sorted(m.metrics.items())])
        parts.append(Panel(metrics, title="metrics", title_align="left", expand=False))
    parts.append(_config_panel(found, m, config))
    if m.lineage:
        lineage = _key_values(_lineage_rows(m.lineage))
        parts.append(Panel(lineage, title="lineage", title_align="left", expand=False))
    files = Table(box=box.SIMPLE_HEAVY, title=f"files ({m.hash_algorithm})", title_justify="left")
    files.add_column("name", no_wrap=True)
    files.add_column("size", justify="right")
    files.add_column("hash", no_wrap=True)
    for name, entry in sorted(m.files.items()):
        files.add_row(Text(name), human_size(entry.size), entry.hash)
    parts.append(files)
    return Group(*parts)


def show_record(found: Resolved, manifest: Manifest, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest plus ``ref``, ``version``, ``aliases``, ``size`` and ``config`` (the run's
    config as its tracker holds it; null when the backend does not report it)."""
    s = found.stored
    return {
        "ref": str(s.ref),
        "version": s.version,
        "aliases": list(s.aliases),
        **manifest.to_json(),
        "size": manifest.size,
        "config": None if config is None else dict(config),
    }



# --------------------------------------------------------------------------- lineage


def lineage_tree(nodes: Sequence[LineageNode]) -> Tree:
    tree = Tree(Text(f"lineage of {nodes[0].ref}"), guide_style="dim")
    branch: Tree | None = None
    current: tuple[str, str] | None = None
    for node in nodes:
        s = node.stored
        if s is None:
            tree.add(Text(f"missing {node.ref}: {node.error}", style="red"))
            continue
        key = (s.run.backend, s.run.ref.path)
        if branch is None or key != current:  # consecutive checkpoints of one run share a branch
            branch, current = tree.add(Text(f"run {_run_label(s.run)}", style="bold")), key
        parts = [f"v{s.version}", f"step {s.step}", _metrics_text(s.metrics), _aliases_text(s.aliases)]
        if node.logged_by:
            parts.append(f"copy, logged by {node.logged_by}")
        averaged = node.lineage.get("averaged_from") or []
        if averaged:
            parts.append(f"average of {', '.join(map(str, averaged))}")
        if node.via == "resumed_from":
            parts.append(f"resumed from {node.parent}")
        elif node.via is None:
            parts.append("(root)")
        branch.add(Text("  ".join(p for p in parts if p)))
    return tree



# --------------------------------------------------------------------------- diff


def _shape(t: TensorDelta) -> str:
    a = "-" if t.shape_a is None else "x".join(map(str, t.shape_a)) or "scalar"
    b = "-" if t.shape_b is None else "x".join(map(str, t.shape_b)) or "scalar"
    return a if a == b else f"{a} -> {b}"


def _dtype(t: TensorDelta) -> str:
    a, b = t.dtype_a or "-", t.dtype_b or "-"
    return a if a == b else f"{a} -> {b}"



_STATUS = {"unchanged": "unchanged", "changed": "changed", "shape": "shape changed",
           "only_a": "only in A", "only_b": "only in B"}


def diff_renderable(d: CheckpointDiff, show_all: bool) -> Group:
    parts: list[Any] = [Text(f"A {d.a.ref} (step {d.a.step})\nB {d.b.ref} (step {d.b.step})")]
    counts = d.counts()
    if not d.changed:
        parts.append(Text(f"no differences: {len(d.tensors)} tensors, the metrics and the other state are identical"))
        return Group(*parts)
    if d.metrics:
        metrics = _table("metrics", ("name", "A", "B", "B - A"), right=("A", "B", "B - A"))
        for m in d.metrics:
            metrics.add_row(Text(m.name), _number(m.a), _number(m.b), _number(m.delta))
        parts.append(metrics)
    rows = d.tensors if show_all else d.changed_tensors
    summary = (f"tensors: {counts['changed']} changed, {counts['shape']} changed shape, {counts['unchanged']} "
               f"unchanged, {counts['only_a']} only in A, {counts['only_b']} only in B")
    if rows:
        tensors = _table(summary, ("name", "status", "shape", "dtype", "max |A-B|", "|A-B|/|A|"),
                         right=("max |A-B|", "|A-B|/|A|"), no_wrap=("name",))
        for t in rows:
            tensors.add_row(Text(t.name), _STATUS[t.status], _shape(t), _dtype(t), _number(t.max_abs),
                            _number(t.rel_l2))
        parts.append(tensors)
    else:
        parts.append(Text(summary))
    parts.append(Text("other state (state.json): " + (f"differs in {', '.join(d.state_keys)}" if d.state_keys
                                                      else "identical")))
    return Group(*parts)
