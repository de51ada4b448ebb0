"""The ``ckpt-track`` command line: inspect, verify and restore stored checkpoints.

    ckpt-track ls local://resnet/3k2j1x
    ckpt-track show local://resnet/3k2j1x@best
    ckpt-track verify local://resnet/3k2j1x@step=500
    ckpt-track restore local://resnet/3k2j1x@best -o ./best

Settings (backend options such as the local store's ``root``) come from
``ckpt_track.toml`` / ``CKPT_TRACK_*`` variables of the working directory, as
for the library.  Every error the library raises on purpose is printed as one
``error: ...`` line on stderr and mapped to an exit code (see ``EXIT_CODES``).

This module holds the Typer app, the error contract (messages and exit codes) and the
entry point; the verbs live in :mod:`.inspect` (read-only) and :mod:`.manage` (those that
write or delete), what they print in :mod:`.render`.  ``ckpt_track.cli`` registers the verbs.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .. import __version__
from ..config import Settings, load_settings
from ..errors import (
    BackendError,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
    IntegrityError,
    InvalidRef,
)

__all__ = ["EXIT_CODES", "Command", "JsonOpt", "app", "exit_code", "fail", "guard", "main", "sdk_prints_to_stderr",
           "settings"]

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

# --------------------------------------------------------------------------- help text
#
# Help is plain text, not Rich markup: square brackets ("[retention]") are words here, not
# styles.  Paragraphs are re-wrapped to the terminal (at most 80 columns) at spaces only, never
# inside a word or after a hyphen (--keep-best stays whole); a paragraph opened by a line holding
# only \b (click's marker) is printed as written, which is how the Examples blocks stay intact.

_VERBATIM = "\b"


def _fill(text: str, width: int, indent: str = "") -> list[str]:
    """Lines of ``text``: paragraphs re-wrapped to ``width``, \b paragraphs kept line by line."""
    wrapper = textwrap.TextWrapper(max(width, 20), initial_indent=indent, subsequent_indent=indent,
                                   break_long_words=False, break_on_hyphens=False)
    lines: list[str] = []
    for paragraph in textwrap.dedent(text).strip("\n").split("\n\n"):
        if lines:
            lines.append("")
        rows = paragraph.splitlines()
        if rows and rows[0].strip() == _VERBATIM:
            lines += [indent + row.rstrip() for row in rows[1:]]
        else:
            lines += wrapper.wrap(" ".join(row.strip() for row in rows))
    return lines


class _Formatter(typer.Context.formatter_class):  # type: ignore[misc,name-defined]
    """Click's help layout, with :func:`_fill` doing the wrapping."""

    def write_text(self, text: str) -> None:
        self.write("\n".join(_fill(text, self.width, " " * self.current_indent)) + "\n")

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_width = min(max((len(first) for first, _ in rows), default=0), col_max) + col_spacing
        pad = " " * (self.current_indent + first_width)
        for first, second in rows:
            head = " " * self.current_indent + first
            body = _fill(second, self.width - len(pad)) if second else []
            if not body:
                self.write(head + "\n")
                continue
            if len(first) + col_spacing <= first_width:
                self.write(head.ljust(len(pad)) + body[0] + "\n")
            else:  # a long option name: its help starts on the next line
                self.write(f"{head}\n{pad}{body[0]}\n")
            for line in body[1:]:
                self.write((pad + line).rstrip() + "\n")


class _Context(typer.Context):
    formatter_class = _Formatter


class _Argument(TyperArgument):
    """An argument shown by its metavar alone: ``REF``, ``[BACKEND]``, ``REF...`` (Typer's own
    rendering adds a type, ``REF <str>``, and braces, ``{REF}``)."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required else f"[{name}]"


def _plain_arguments(params: Sequence[Any]) -> None:
    for param in params:
        if type(param) is TyperArgument:
            param.__class__ = _Argument


class Command(TyperCommand):
    """A verb of ``ckpt-track``: plain help text (see :func:`_fill`), arguments by their metavar."""

    context_class = _Context

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_arguments(self.params)


class _Group(TyperGroup):
    context_class = _Context

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_arguments(self.params)


app = typer.Typer(
    name="ckpt-track",
    cls=_Group,
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,
    # locals of a crashing frame may hold tensors or credentials
    pretty_exceptions_show_locals=False,
)


# --------------------------------------------------------------------------- errors and exit codes


def exit_code(exc: BaseException) -> int:
    """The process exit status for an error (see ``EXIT_CODES``)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def fail(exc: BaseException) -> NoReturn:
    """Print ``error: <first line>`` (details indented below) and exit with the error's code."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines += [str(note).strip() for note in getattr(exc, "__notes__", ())]  # e.g. "set by ..."
    first = lines[0] if lines else type(exc).__name__
    typer.echo(f"error: {first}", err=True)
    for line in lines[1:]:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(exit_code(exc))


@contextlib.contextmanager
def guard() -> Iterator[None]:
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
                fail(IntegrityError(f"{exc}; {len(damaged)} damaged checkpoint(s) of the run were skipped "
                                     "(see the warnings above), the one asked for may be among them"))
            fail(exc)
        except CkptTrackError as exc:
            _flush_warnings(caught)
            fail(exc)
        except OSError as exc:  # a full disk or a permission problem is not a bug: no traceback
            _flush_warnings(caught)
            fail(exc)
        except (ValueError, RecursionError) as exc:  # e.g. a NUL byte in a path given on the command line
            _flush_warnings(caught)
            fail(ConfigError(f"{type(exc).__name__}: {exc}"))
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



# --------------------------------------------------------------------------- what every verb needs


def settings() -> Settings:
    """The settings of this invocation's working directory and environment, read per command
    (a test runner changes both between calls in one process)."""
    return load_settings()


def sdk_prints_to_stderr() -> contextlib.redirect_stdout[Any]:
    """Tracker SDKs print to stdout (MLflow's "View run ... at" when a run ends); stdout is ours,
    for tables and --json."""
    return contextlib.redirect_stdout(sys.stderr)



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
    :v3, or a checkpoint directory (what restore -o writes); settings come from
    ckpt_track.toml and CKPT_TRACK_* variables.  Shell completion: ckpt-track
    --install-completion.

    Examples:

    \b
      ckpt-track projects
      ckpt-track runs local://resnet
      ckpt-track ls local://resnet/3k2j1x
      CKPT_TRACK_LOCAL__ROOT=/data/ckpts ckpt-track ls local://resnet/3k2j1x
    """



JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]



# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``ckpt-track`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    app(args=None if argv is None else list(argv), prog_name="ckpt-track")
