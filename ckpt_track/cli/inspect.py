"""The read-only verbs: ``ls``, ``show``, ``verify``, ``lineage`` and ``diff``.

Each one resolves through :mod:`ckpt_track.resolve` or calls an operation of
:mod:`ckpt_track.ops`, and hands the result to :mod:`.render`; nothing here changes a
store.  ``ckpt_track.cli`` registers them on the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ..errors import ConfigError, IntegrityError
from ..external import is_record, verify_copies
from ..format import verify
from ..ops.diff import diff
from ..ops.lineage import lineage
from ..refs import parse_ref
from ..resolve import open_backend, resolve
from . import render
from .application import JsonOpt, guard, sdk_prints_to_stderr, settings

__all__ = ["diff_command", "lineage_command", "ls_command", "show_command", "verify_command"]


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
    with guard():
        parsed = parse_ref(ref)
        backend = open_backend(parsed.backend, settings(), parsed)
        run = backend.find_run(parsed)
        stored = backend.list(run)
    if as_json:
        render.print_json([render.ls_record(s) for s in stored])
        return
    console = render.out_console()
    if not stored:
        console.print(Text(f"{run.ref} has no committed checkpoints yet"))
        return
    console.print(render.ls_table(run, stored, all_aliases))


def show_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@best.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one checkpoint: metrics, lineage and the files of its manifest.

    Example: ckpt-track show local://resnet/3k2j1x@best
    """
    with guard():
        found = resolve(ref, settings())
        ckpt = found.fetch()
    if as_json:
        render.print_json(render.show_record(found, ckpt.manifest))
        return
    render.out_console().print(render.show_renderable(found, ckpt))


def verify_command(
    ref: Annotated[
        str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@step=500.")
    ],
    all_copies: Annotated[bool, typer.Option("--all-copies", help="With [storage] url and replicas: download and "
                                             "verify the checkpoint from every copy.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every file of a checkpoint against its manifest.

    Exits with 4 and names each missing or modified file when it does not match.

    Example: ckpt-track verify local://resnet/3k2j1x@best
    """
    if all_copies:
        return _verify_copies(ref, as_json)
    with guard():
        found = resolve(ref, settings())
        ckpt = found.fetch()
        try:
            with render.spinner(render.err_console(), f"verifying {found.stored.ref}", enabled=not as_json):
                # re-read the manifest from disk (its own digest included): a damaged manifest fails here too
                manifest = verify(ckpt.path)
        except (IntegrityError, OSError) as exc:
            if as_json:
                render.print_json({"ref": str(found.stored.ref), "ok": False, "files": len(ckpt.manifest.files),
                                   "bytes": ckpt.manifest.size, "error": str(exc)})
            raise
    ref_text = str(found.stored.ref)
    if as_json:
        render.print_json({"ref": ref_text, "ok": True, "files": len(manifest.files), "bytes": manifest.size,
                           "error": None})
        return
    render.out_console().print(Text(
        f"OK {ref_text}: {len(manifest.files)} files, {render.human_size(manifest.size)} ({manifest.size} bytes) "
        "match the manifest"
    ))


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
    with guard(), sdk_prints_to_stderr():
        nodes = lineage(ref, settings=settings())
    if as_json:
        render.print_json([n.to_json() for n in nodes])
        return
    render.out_console().print(render.lineage_tree(nodes))


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
    with guard(), sdk_prints_to_stderr():
        result = diff(a, b, prefix=prefix, settings=settings())
    if as_json:
        render.print_json(result.to_json())
        return
    render.out_console().print(render.diff_renderable(result, show_all))


def _verify_copies(ref: str, as_json: bool) -> None:
    import tempfile

    with guard():
        s = settings()
        found = resolve(ref, s)
        record = found.record()
        if not is_record(record):
            raise ConfigError(f"{found.stored.ref} is stored in one place only (no [storage] url record); "
                              "use `ckpt-track verify` without --all-copies")
        with tempfile.TemporaryDirectory(prefix="ckpt-track-verify-") as scratch:
            results = verify_copies(record, s, Path(scratch))
    bad = [(u, e) for u, e in results if e is not None]
    if as_json:
        render.print_json({"ref": str(found.stored.ref), "ok": not bad,
                           "copies": [{"url": u, "ok": e is None, "error": e} for u, e in results]})
    else:
        console = render.out_console()
        for url, error in results:
            console.print(Text(f"OK {url}" if error is None else f"FAILED {url}: {error}"))
    if bad:
        raise typer.Exit(4)
