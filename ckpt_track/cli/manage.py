"""The verbs that write or delete: ``restore``, ``gc``, ``copy`` and ``average``.

The work is the library's (:mod:`ckpt_track.restoring`, :mod:`ckpt_track.ops`), so that it is
usable from Python too; these commands parse options, show progress on stderr, and hand
the results to :mod:`.render`.  ``ckpt_track.cli`` registers them on the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ..backends import registry
from ..errors import ConfigError
from ..format import verify
from ..objstore import GC_GRACE_S, is_url
from ..ops.average import average
from ..ops.copy import copy
from ..ops.gc import gc, gc_objects
from ..records import Stored
from ..resolve import resolve
from ..restoring import check_destination, restore_into
from . import render, render_manage
from .application import JsonOpt, guard, sdk_prints_to_stderr, settings

__all__ = ["average_command", "copy_command", "gc_command", "restore_command"]


def restore_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. "
                                       "local://PROJECT/RUN@best, or a checkpoint directory.")],
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
    checkpoint directory: every verb takes it as REF, and ct.restore("./best")
    loads it.

    Examples:

    \b
      ckpt-track restore local://resnet/3k2j1x@best -o ./best
      ckpt-track restore mlflow://RUN_ID@step=500 -o ./s500 --json
    """
    err = render.err_console()
    show_progress = not (quiet or as_json) and err.is_terminal
    with guard():
        # refuse a bad --output before hashing or downloading a possibly large checkpoint
        check_destination(output, force)
        found = resolve(ref, settings())
        ckpt = found.fetch()
        with render.spinner(err, f"verifying {found.stored.ref}", enabled=show_progress):
            verify(ckpt.path, ckpt.manifest)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, disable=not show_progress) as bar:
            task = bar.add_task("restoring", total=ckpt.size)
            restored = restore_into(ckpt, output, force=force, progress=lambda n: bar.advance(task, n))
    ref_text = str(found.stored.ref)
    if as_json:
        render.print_json({"ref": ref_text, "path": str(restored.path), "step": restored.step, "size": restored.size})
        return
    render.out_console().print(Text(
        f"restored {ref_text} (step {restored.step}, {render.human_size(restored.size)}) to {restored.path}"
    ))


def gc_command(
    ref: Annotated[str, typer.Argument(metavar="RUN", help="A run reference (a selector, if any, is ignored), or an "
                                       "object-store URL such as s3://bucket/prefix.")],
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
    grace: Annotated[float, typer.Option("--grace", metavar="SECONDS", help="For an object-store URL: keep "
                                         "unreferenced objects younger than this (a save in progress).")] = GC_GRACE_S,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention to a run on any backend: delete the versions no rule keeps.

    Never deletes a version holding latest, best or one of your own aliases.  The
    --keep-* options replace the rules of [retention] in ckpt_track.toml; without
    any, those configured rules apply.  The table's "kept by" column (kept_by in
    --json) names the rules that keep each version.  Run with --dry-run first.

    Given an object-store URL (s3://bucket/prefix) instead of a run, removes the
    objects no version under it references (left by interrupted saves).

    Examples:

    \b
      ckpt-track gc local://resnet/3k2j1x --keep-last 3 --dry-run
      ckpt-track gc local://resnet/3k2j1x --keep-best 1 --metric val/loss
      ckpt-track gc s3://ckpts/team --dry-run
    """
    if is_url(ref) and ref.partition("://")[0] not in registry.names():
        with guard():
            found = gc_objects(ref, dry_run=dry_run, grace_s=grace, settings=settings())
        if as_json:
            render.print_json(render_manage.object_gc_record(found))
        else:
            render.out_console().print(render_manage.object_gc_summary(found))
        return
    with guard(), sdk_prints_to_stderr():
        result = gc(ref, keep_last=keep_last, keep_best=keep_best, keep_every=keep_every, metric=metric,
                    mode=mode, dry_run=dry_run, settings=settings())
    if as_json:
        render.print_json(render_manage.gc_record(result))
        return
    console = render.out_console()
    console.print(render_manage.gc_table(result))
    console.print(render_manage.gc_summary(result))


_TARGET_HELP = (
    "The run to copy into: an existing run (mlflow://RUN_ID, local://PROJECT/RUN) or "
    "BACKEND://PROJECT/NAME, created if missing (for MLflow, PROJECT is the experiment). "
    "?key=value sets backend options, e.g. ?tracking_uri=http://host:5000 or ?root=/data/ckpts."
)


def copy_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint (with a selector), a whole run "
                                       "(without), or a checkpoint directory.")],
    to: Annotated[str, typer.Option("--to", metavar="TARGET", help=_TARGET_HELP)],
    no_link: Annotated[bool, typer.Option("--no-link", help="Copy every file, even where the target is a local "
                                          "store on the same file system (there files are hard-linked: "
                                          "read-only, sharing inodes with the source).")] = False,
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

    Into a local store on the same file system, files are hard-linked (read-only,
    sharing inodes with the source) unless --no-link; the last line says which.

    Examples:

    \b
      ckpt-track copy mlflow://RUN_ID --to local://resnet/mirror
      ckpt-track copy local://resnet/3k2j1x@best --to local://resnet/b --no-link
      ckpt-track copy ./best --to mlflow://resnet/imported
    """
    err = render.err_console()
    show_progress = not (quiet or as_json) and err.is_terminal
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with guard(), sdk_prints_to_stderr(), Progress(*columns, console=err, disable=not show_progress) as bar:
        task = bar.add_task("copying", total=None)

        def advance(done: int, total: int, s: Stored) -> None:
            bar.update(task, completed=done, total=total, description=f"copying step {s.step}")

        result = copy(ref, to, settings=settings(), progress=advance, link=not no_link)
    rows = render_manage.copy_rows(result)
    if as_json:
        render.print_json(render_manage.copy_record(result, rows))
        return
    console = render.out_console()
    console.print(render_manage.copy_table(result, rows))
    console.print(render_manage.copy_summary(result))


def average_command(
    refs: Annotated[list[str], typer.Argument(metavar="REF...", help="Two or more checkpoints of one model "
                                              "(references or checkpoint directories).")],
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

    Examples:

    \b
      ckpt-track average local://resnet/3k2j1x:v8 local://resnet/3k2j1x:v9 -o swa
      ckpt-track average ./a ./b ./c -o local://resnet/soup --alias soup
    """
    with guard(), sdk_prints_to_stderr():
        if non_float not in ("equal", "first"):
            raise ConfigError(f"--non-float must be 'equal' or 'first', got {non_float!r}")
        result = average(refs, output, aliases=alias or (), settings=settings(),
                         non_float="first" if non_float == "first" else "equal")
    if as_json:
        render.print_json(render_manage.average_record(result))
        return
    render.out_console().print(render_manage.average_text(result))

