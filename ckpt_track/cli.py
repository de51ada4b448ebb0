"""The ``ckpt-track`` command line: inspect, verify and restore stored checkpoints.

    ckpt-track ls local://resnet/3k2j1x
    ckpt-track show local://resnet/3k2j1x@best
    ckpt-track verify local://resnet/3k2j1x@step=500
    ckpt-track restore local://resnet/3k2j1x@best -o ./best

Settings (backend options such as the local store's ``root``) come from
``ckpt_track.toml`` / ``CKPT_TRACK_*`` variables of the working directory, as
for the library.  Every error the library raises on purpose is printed as one
``error: ...`` line on stderr and mapped to an exit code (see ``EXIT_CODES``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from . import __version__, tools
from .records import RunInfo, Stored
from .config import Settings, load_settings
from .errors import (
    BackendError,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from .format import MANIFEST, LocalCheckpoint, Manifest, copy_checkpoint, fsync_dir, verify
from .refs import parse_ref
from .resolve import Resolved, open_backend, resolve

__all__ = ["EXIT_CODES", "app", "exit_code", "human_size", "main", "restore_into"]

#: Exit status per error class; the first matching entry wins (subclasses come first).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (InvalidRef, 2),
    (CheckpointNotFound, 3),
    (IntegrityError, 4),
    (BackendError, 5),
    (CkptTrackError, 1),
)

_EPILOG = (
    "Exit codes: 0 success; "
    "1 any other error (including file-system errors); "
    "2 bad reference, settings or options; "
    "3 run or checkpoint not found; "
    "4 integrity check failed (a file is missing or does not match the manifest); "
    "5 the tracker backend failed."
)

# Wide enough that piped tables keep whole refs and hashes (greppable); a terminal uses its own width.
_PIPE_WIDTH = 250

app = typer.Typer(
    name="ckpt-track",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    # locals of a crashing frame may hold tensors or credentials
    pretty_exceptions_show_locals=False,
)


# --------------------------------------------------------------------------- output helpers


def _stdout() -> Console:
    """A console on the current ``sys.stdout`` (test runners swap it per call)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    return console


def _stderr() -> Console:
    """Progress bars and spinners go here, so ``--json`` output on stdout stays clean."""
    return Console(stderr=True, highlight=False)


def exit_code(exc: BaseException) -> int:
    """The process exit status for an error (see ``EXIT_CODES``)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _fail(exc: BaseException) -> NoReturn:
    """Print ``error: <first line>`` (details indented below) and exit with the error's code."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines += [str(note).strip() for note in getattr(exc, "__notes__", ())]  # e.g. "set by ..."
    first = lines[0] if lines else type(exc).__name__
    typer.echo(f"error: {first}", err=True)
    for line in lines[1:]:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(exit_code(exc))


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Turn library errors into one-line messages and exit codes, and warnings into
    ``warning:`` lines (Python's warning format would show source lines to users)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield
        except CheckpointNotFound as exc:
            damaged = _damaged_skipped(caught)
            _flush_warnings(caught)
            if damaged:  # the checkpoint asked for may be the damaged one: an integrity failure
                _fail(IntegrityError(f"{exc}; {len(damaged)} damaged checkpoint(s) of the run were skipped "
                                     "(see the warnings above), the one asked for may be among them"))
            _fail(exc)
        except CkptTrackError as exc:
            _flush_warnings(caught)
            _fail(exc)
        except OSError as exc:  # a full disk or a permission problem is not a bug: no traceback
            _flush_warnings(caught)
            _fail(exc)
        except (ValueError, RecursionError) as exc:  # e.g. a NUL byte in a path given on the command line
            _flush_warnings(caught)
            _fail(ConfigError(f"{type(exc).__name__}: {exc}"))
        _flush_warnings(caught)


def _damaged_skipped(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings of a listing that skipped damaged checkpoints."""
    return [str(w.message) for w in caught if "damaged checkpoint" in str(w.message)]


def _flush_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        # library warnings (a skipped damaged checkpoint) matter to users; deprecation noise does not
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    caught.clear()


def _print_json(data: Any) -> None:
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


def _settings() -> Settings:
    return load_settings()


@contextlib.contextmanager
def _spinner(console: Console, message: str, enabled: bool) -> Iterator[None]:
    if enabled and console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


# --------------------------------------------------------------------------- app


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ckpt-track {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Inspect, verify and restore training checkpoints recorded by ckpt_track.

    REF is a checkpoint reference such as local://PROJECT/RUN@best, @step=500 or
    :v3; settings come from ckpt_track.toml and CKPT_TRACK_* variables, e.g.
    CKPT_TRACK_LOCAL__ROOT=/data/ckpts ckpt-track ls local://resnet/3k2j1x
    """


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


# --------------------------------------------------------------------------- ls


def _ls_record(s: Stored) -> dict[str, Any]:
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


def _ls_table(run: RunInfo, stored: Sequence[Stored], all_aliases: bool) -> Table:
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


@app.command("ls")
def ls_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A run reference; a selector, if any, is ignored.")],
    as_json: JsonOpt = False,
    all_aliases: Annotated[
        bool, typer.Option("--all-aliases", help="Also show the step-N alias every version carries.")
    ] = False,
) -> None:
    """List every checkpoint of a run, oldest version first.

    Example: ckpt-track ls local://resnet/3k2j1x
    """
    with _guard():
        parsed = parse_ref(ref)
        backend = open_backend(parsed.backend, _settings(), parsed)
        run = backend.find_run(parsed)
        stored = backend.list(run)
    if as_json:
        _print_json([_ls_record(s) for s in stored])
        return
    console = _stdout()
    if not stored:
        console.print(Text(f"{run.ref} has no committed checkpoints yet"))
        return
    console.print(_ls_table(run, stored, all_aliases))


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


def _key_values(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def _show_renderable(found: Resolved, ckpt: LocalCheckpoint) -> Group:
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


def _show_record(found: Resolved, manifest: Manifest) -> dict[str, Any]:
    s = found.stored
    return {
        "ref": str(s.ref),
        "version": s.version,
        "aliases": list(s.aliases),
        **manifest.to_json(),
        "size": manifest.size,
    }


@app.command("show")
def show_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@best.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one checkpoint: metrics, lineage and the files of its manifest.

    Example: ckpt-track show local://resnet/3k2j1x@best
    """
    with _guard():
        found = resolve(ref, _settings())
        ckpt = found.fetch()
    if as_json:
        _print_json(_show_record(found, ckpt.manifest))
        return
    _stdout().print(_show_renderable(found, ckpt))


# --------------------------------------------------------------------------- verify


@app.command("verify")
def verify_command(
    ref: Annotated[
        str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@step=500.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every file of a checkpoint against its manifest.

    Exits with 4 and names each missing or modified file when it does not match.

    Example: ckpt-track verify local://resnet/3k2j1x@best
    """
    with _guard():
        found = resolve(ref, _settings())
        ckpt = found.fetch()
        try:
            with _spinner(_stderr(), f"verifying {found.stored.ref}", enabled=not as_json):
                # re-read the manifest from disk (its own digest included): a damaged manifest fails here too
                manifest = verify(ckpt.path)
        except (IntegrityError, OSError) as exc:
            if as_json:
                _print_json({"ref": str(found.stored.ref), "ok": False, "files": len(ckpt.manifest.files),
                             "bytes": ckpt.manifest.size, "error": str(exc)})
            raise
    ref_text = str(found.stored.ref)
    if as_json:
        _print_json({"ref": ref_text, "ok": True, "files": len(manifest.files), "bytes": manifest.size,
                     "error": None})
        return
    _stdout().print(Text(
        f"OK {ref_text}: {len(manifest.files)} files, {human_size(manifest.size)} ({manifest.size} bytes) "
        "match the manifest"
    ))


# --------------------------------------------------------------------------- restore


def _absolute(dest: Path) -> Path:
    """``dest`` made absolute; a symlink is followed so the rename replaces its target, not the link."""
    dest = Path(os.path.abspath(dest.expanduser()))
    return dest.resolve() if dest.is_symlink() else dest


def _check_destination(dest: Path, force: bool) -> bool:
    """Raise unless ``dest`` may receive a checkpoint; True when an old one is to be replaced."""
    if not dest.name:
        raise ConfigError(f"cannot restore into {dest}; give a directory below it")
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise ConfigError(f"{dest} exists and is not a directory; pick another --output")
    if not any(dest.iterdir()):
        return False
    if not force:
        raise ConfigError(
            f"{dest} is not empty; pick an empty or new directory, or pass --force to replace "
            "a checkpoint restored there before"
        )
    if not (dest / MANIFEST).is_file():
        # --force must never become `rm -rf` of an arbitrary directory given by mistake
        raise ConfigError(
            f"{dest} is not empty and holds no checkpoint ({MANIFEST}); --force only replaces a "
            "previously restored checkpoint, so empty it yourself or pick another --output"
        )
    return True


def restore_into(ckpt: LocalCheckpoint, dest: Path, *, force: bool = False,
                 progress: Callable[[int], None] | None = None) -> LocalCheckpoint:
    """Copy a verified checkpoint's files and manifest so they sit directly in ``dest``.

    ``dest`` must not exist or be empty; with ``force`` a directory holding an
    earlier checkpoint is replaced.  The copy is staged in a hidden sibling and
    renamed into place, so ``dest`` never holds a partial checkpoint.
    """
    dest = _absolute(dest)
    replace_old = _check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staged = copy_checkpoint(ckpt, dest.parent, f".{dest.name}.restoring-{tag}", link=False, progress=progress)
    old = dest.parent / f".{dest.name}.replaced-{tag}"
    try:
        if replace_old:
            os.rename(dest, old)
            try:
                os.rename(staged.path, dest)
            except OSError:
                os.rename(old, dest)  # put the previous checkpoint back
                raise
        else:
            os.rename(staged.path, dest)  # POSIX replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(staged.path, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    if replace_old:
        shutil.rmtree(old, ignore_errors=True)
    return LocalCheckpoint(dest, ckpt.manifest)


@app.command("restore")
def restore_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@best.")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="DIR", help="Directory to write the checkpoint's files into; "
                     "must be new or empty."),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace a checkpoint restored into --output before.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a checkpoint's files (verified first) into a directory of its own.

    The files (safetensors shards, state.json, manifest.json) land directly in
    --output, which must not exist or be empty.  The result is itself a
    checkpoint directory: `ckpt_track.format.verify` and `load_checkpoint` read it.

    Example: ckpt-track restore local://resnet/3k2j1x@best -o ./best
    """
    err = _stderr()
    show_progress = not (quiet or as_json) and err.is_terminal
    with _guard():
        # refuse a bad --output before hashing or downloading a possibly large checkpoint
        _check_destination(_absolute(output), force)
        found = resolve(ref, _settings())
        ckpt = found.fetch()
        with _spinner(err, f"verifying {found.stored.ref}", enabled=show_progress):
            verify(ckpt.path, ckpt.manifest)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, disable=not show_progress) as bar:
            task = bar.add_task("restoring", total=ckpt.size)
            restored = restore_into(ckpt, output, force=force, progress=lambda n: bar.advance(task, n))
    ref_text = str(found.stored.ref)
    if as_json:
        _print_json({"ref": ref_text, "path": str(restored.path), "step": restored.step, "size": restored.size})
        return
    _stdout().print(Text(
        f"restored {ref_text} (step {restored.step}, {human_size(restored.size)}) to {restored.path}"
    ))


# --------------------------------------------------------------------------- lineage / diff / gc / copy / average
# Thin commands over ckpt_track.tools, which holds the logic so that it is usable from Python too.


def _sdk_prints_to_stderr() -> contextlib.redirect_stdout[Any]:
    """Tracker SDKs print to stdout (MLflow's "View run ... at" when a run ends); stdout is ours,
    for tables and --json."""
    return contextlib.redirect_stdout(sys.stderr)


def _table(title: str, columns: Sequence[str], right: Sequence[str] = (), no_wrap: Sequence[str] = ()) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", no_wrap=name in no_wrap)
    return table


def _aliases_text(aliases: Sequence[str]) -> str:
    shown = _shown_aliases(aliases, all_aliases=False)
    return f"[{', '.join(shown)}]" if shown else ""


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={_metric(v)}" for k, v in sorted(metrics.items()))


def _run_label(run: RunInfo) -> str:
    return str(run.ref) + ("" if run.name == run.run_id else f" ({run.name})")


def _lineage_tree(nodes: Sequence[tools.LineageNode]) -> Tree:
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


@app.command("lineage")
def lineage_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@best.")],
    as_json: JsonOpt = False,
) -> None:
    """Show where a checkpoint comes from: parents and resumes back to the root, across runs and backends.

    The chain follows each manifest's parent (the previous checkpoint of the run, or
    the checkpoint a run resumed from); a parent that no longer exists ends it.
    --json prints the chain as a list, REF first.

    Example: ckpt-track lineage local://resnet/3k2j1x@best
    """
    with _guard(), _sdk_prints_to_stderr():
        nodes = tools.lineage(ref, settings=_settings())
    if as_json:
        _print_json([n.to_json() for n in nodes])
        return
    _stdout().print(_lineage_tree(nodes))


def _number(value: float | None) -> str:
    return "-" if value is None else _metric(value)


def _shape(t: tools.TensorDelta) -> str:
    a = "-" if t.shape_a is None else "x".join(map(str, t.shape_a)) or "scalar"
    b = "-" if t.shape_b is None else "x".join(map(str, t.shape_b)) or "scalar"
    return a if a == b else f"{a} -> {b}"


def _dtype(t: tools.TensorDelta) -> str:
    a, b = t.dtype_a or "-", t.dtype_b or "-"
    return a if a == b else f"{a} -> {b}"


_STATUS = {"unchanged": "unchanged", "changed": "changed", "shape": "shape changed",
           "only_a": "only in A", "only_b": "only in B"}


def _diff_renderable(d: tools.CheckpointDiff, show_all: bool) -> Group:
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


@app.command("diff")
def diff_command(
    a: Annotated[str, typer.Argument(metavar="REF_A", help="The first checkpoint (A).")],
    b: Annotated[str, typer.Argument(metavar="REF_B", help="The second checkpoint (B).")],
    prefix: Annotated[
        str | None, typer.Option("--prefix", metavar="PREFIX", help="Compare only tensors whose name starts "
                                 "with PREFIX, e.g. model/.")
    ] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also list unchanged tensors.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare two checkpoints: metric deltas (B - A), changed tensors, other state.

    A tensor is unchanged when its bytes are identical; for a changed one the table
    gives max |A-B| and the relative L2 distance ||A-B|| / ||A||.  Both checkpoints are
    verified against their manifests first.

    Example: ckpt-track diff local://resnet/3k2j1x:v3 local://resnet/3k2j1x@best
    """
    with _guard(), _sdk_prints_to_stderr():
        result = tools.diff(a, b, prefix=prefix, settings=_settings())
    if as_json:
        _print_json(result.to_json())
        return
    _stdout().print(_diff_renderable(result, show_all))


def _gc_table(result: tools.GcResult) -> Table:
    metric = result.retention.metric
    doomed = {s.version for s in result.planned}
    rules = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in (("keep_last", result.retention.keep_last),
                                                                 ("keep_best", result.retention.keep_best),
                                                                 ("keep_every", result.retention.keep_every)) if v)
    title = f"{_run_label(result.run)}: {rules}" + (f" by {metric} ({result.retention.mode})"
                                                    if result.retention.keep_best else "")
    table = _table(title, ("version", "step", "aliases", metric or "metric", "size", "action"),
                   right=("version", "step", metric or "metric", "size"))
    verb = "would delete" if result.dry_run else "deleted"
    for s in sorted((*result.kept, *result.planned), key=lambda x: x.version):
        value = s.metrics.get(metric) if metric else None
        table.add_row(f"v{s.version}", str(s.step), Text(", ".join(_shown_aliases(s.aliases, False))),
                      _number(value), human_size(s.size), verb if s.version in doomed else "keep")
    return table


@app.command("gc")
def gc_command(
    ref: Annotated[str, typer.Argument(metavar="RUN", help="A run reference; a selector, if any, is ignored.")],
    keep_last: Annotated[int | None, typer.Option("--keep-last", metavar="N", help="Keep the N newest.")] = None,
    keep_best: Annotated[
        int | None, typer.Option("--keep-best", metavar="K", help="Keep the K best by --metric.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", metavar="M", help="Metric ranking --keep-best (default: [retention] "
                                 "metric, then monitor).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", metavar="min|max", help="Whether lower or higher --metric is better.")
    ] = None,
    keep_every: Annotated[
        int | None, typer.Option("--keep-every", metavar="S", help="Keep checkpoints whose step is a multiple of S.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Delete nothing; list what would be deleted.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention to a run on any backend: delete the versions no rule keeps.

    Never deletes a version holding latest, best or one of your own aliases.  The
    --keep-* options replace the rules of [retention] in ckpt_track.toml; without
    any, those configured rules apply.  Run with --dry-run first.

    Example: ckpt-track gc local://resnet/3k2j1x --keep-last 3 --keep-best 1 --metric val/loss --dry-run
    """
    with _guard(), _sdk_prints_to_stderr():
        result = tools.gc(ref, keep_last=keep_last, keep_best=keep_best, keep_every=keep_every, metric=metric,
                          mode=mode, dry_run=dry_run, settings=_settings())
    if as_json:
        _print_json({"run": str(result.run.ref), "dry_run": result.dry_run,
                     "delete": [_ls_record(s) for s in result.planned],
                     "deleted": [_ls_record(s) for s in result.deleted],
                     "keep": [_ls_record(s) for s in result.kept]})
        return
    console = _stdout()
    console.print(_gc_table(result))
    size = human_size(sum(s.size for s in result.planned))
    if not result.planned:
        console.print(Text("nothing to delete"))
    elif result.dry_run:
        console.print(Text(f"dry run: would delete {len(result.planned)} of {len(result.planned) + len(result.kept)}"
                           f" checkpoints ({size}); run without --dry-run to delete them"))
    else:
        console.print(Text(f"deleted {len(result.deleted)} checkpoints ({size}); kept {len(result.kept)}"))


_TARGET_HELP = (
    "The run to copy into: an existing run (mlflow://RUN_ID, local://PROJECT/RUN) or "
    "BACKEND://PROJECT/NAME, created if missing (for MLflow, PROJECT is the experiment). "
    "?key=value sets backend options, e.g. ?tracking_uri=http://host:5000 or ?root=/data/ckpts."
)


@app.command("copy")
def copy_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint (with a selector) or a whole run (without).")],
    to: Annotated[str, typer.Option("--to", metavar="TARGET", help=_TARGET_HELP)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy checkpoints between trackers, keeping steps, metrics, aliases and lineage.

    REF without a selector copies every version of the run, oldest first; with one
    (@best, @step=500, :v3) just that checkpoint.  Files are verified, then sent
    unchanged (the manifest too, so lineage edges survive).  Versions already in the
    target are skipped, so an interrupted copy can be run again.

    TARGET: BACKEND://PROJECT/NAME creates (or reuses) the run NAME in PROJECT, e.g.
    local://resnet/mirror or mlflow://resnet/mirror (PROJECT is the MLflow experiment);
    an existing run's reference (mlflow://RUN_ID) appends to it.  Add ?key=value for
    backend options of the target, e.g. mlflow://resnet/mirror?tracking_uri=http://host:5000.

    Example: ckpt-track copy mlflow://0f1e2d3c4b5a69788796a5b4c3d2e1f0 --to local://resnet/mirror
    """
    err = _stderr()
    show_progress = not (quiet or as_json) and err.is_terminal
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with _guard(), _sdk_prints_to_stderr(), Progress(*columns, console=err, disable=not show_progress) as bar:
        task = bar.add_task("copying", total=None)

        def advance(done: int, total: int, s: Stored) -> None:
            bar.update(task, completed=done, total=total, description=f"copying step {s.step}")

        result = tools.copy(ref, to, settings=_settings(), progress=advance)
    rows = [(src, dst, "copied") for src, dst in result.copied] + [(src, dst, "already there")
                                                                   for src, dst in result.skipped]
    rows.sort(key=lambda r: r[0].version)
    if as_json:
        _print_json({"source": str(result.source.ref), "target": str(result.target.ref),
                     "copied": [{"from": str(a.ref), "to": str(b.ref), "step": a.step, "aliases": list(a.aliases),
                                 "status": status} for a, b, status in rows]})
        return
    table = _table(f"{_run_label(result.source)} -> {_run_label(result.target)}",
                   ("step", "aliases", "from", "to", "status"), right=("step",), no_wrap=("from", "to"))
    for src, dst, status in rows:
        table.add_row(str(src.step), Text(", ".join(_shown_aliases(src.aliases, False))), Text(str(src.ref)),
                      Text(str(dst.ref)), status)
    console = _stdout()
    console.print(table)
    console.print(Text(f"copied {len(result.copied)}, already there {len(result.skipped)}, into {result.target.ref}"))


@app.command("average")
def average_command(
    refs: Annotated[list[str], typer.Argument(metavar="REF...", help="Two or more checkpoints of one model.")],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="DIR|RUN", help="A new or empty directory, or a run to log "
                          "the result to (as for copy --to).")
    ],
    alias: Annotated[
        list[str] | None, typer.Option("--alias", metavar="NAME", help="Alias for the logged result (repeatable).")
    ] = None,
    non_float: Annotated[
        str, typer.Option("--non-float", metavar="equal|first", help="Integer buffers (e.g. BatchNorm's "
                          "num_batches_tracked) are taken from the first checkpoint; 'equal' (default) requires "
                          "them to be equal in all.")
    ] = "equal",
    as_json: JsonOpt = False,
) -> None:
    """Average model weights: the element-wise mean of the float model/* tensors.

    The result holds the model only (no optimizer, scheduler or RNG state), the step
    of the newest source, and lineage naming every source.  Logged into a new run it
    becomes that run's latest; into an existing run it moves only the aliases you give.

    Example: ckpt-track average local://resnet/3k2j1x:v8 local://resnet/3k2j1x:v9 local://resnet/3k2j1x:v10 -o ./swa
    """
    with _guard(), _sdk_prints_to_stderr():
        if non_float not in ("equal", "first"):
            raise ConfigError(f"--non-float must be 'equal' or 'first', got {non_float!r}")
        result = tools.average(refs, output, aliases=alias or (), settings=_settings(),
                               non_float="first" if non_float == "first" else "equal")
    where = str(result.path) if result.path is not None else str(result.stored.ref) if result.stored else ""
    if as_json:
        _print_json({"sources": list(result.sources), "step": result.step, "path": None if result.path is None
                     else str(result.path), "ref": None if result.stored is None else str(result.stored.ref),
                     "averaged": list(result.averaged), "taken_from_first": list(result.taken)})
        return
    _stdout().print(Text(
        f"averaged {len(result.sources)} checkpoints ({len(result.averaged)} tensors"
        + (f"; {len(result.taken)} non-float taken from the first" if result.taken else "")
        + f") into {where} at step {result.step}"
    ))


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``ckpt-track`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    app(args=None if argv is None else list(argv), prog_name="ckpt-track")


if __name__ == "__main__":
    main(sys.argv[1:])
