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

from . import __version__
from .backends.base import RunInfo, Stored
from .config import Settings, load_settings
from .errors import (
    BackendError,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)
from .format import MANIFEST, LocalCheckpoint, Manifest, copy_checkpoint, verify
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
        except CkptTrackError as exc:
            _flush_warnings(caught)
            _fail(exc)
        except OSError as exc:  # a full disk or a permission problem is not a bug: no traceback
            _flush_warnings(caught)
            _fail(exc)
        _flush_warnings(caught)


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
                # re-read the manifest from disk: a damaged manifest must fail here too
                manifest = verify(ckpt.path)
        except IntegrityError as exc:
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    _fsync_dir(dest.parent)
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


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``ckpt-track`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    app(args=None if argv is None else list(argv), prog_name="ckpt-track")


if __name__ == "__main__":
    main(sys.argv[1:])
