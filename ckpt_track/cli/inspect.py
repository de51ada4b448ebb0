"""The read-only verbs: ``projects``, ``runs``, ``ls``, ``show``, ``verify``, ``lineage`` and ``diff``.

Each one resolves through :mod:`ckpt_track.resolve` or calls an operation of
:mod:`ckpt_track.ops`, and hands the result to :mod:`.render`; nothing here changes a
store.  ``ckpt_track.cli`` registers them on the app.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

import typer
from rich.text import Text

from ..backends import registry
from ..config import Settings
from ..errors import ConfigError, IntegrityError
from ..external import is_record, verify_copies
from ..format import verify
from ..ops.diff import diff
from ..ops.lineage import lineage
from ..protocol import Backend
from ..refs import Ref
from ..resolve import Resolved, Resolver, open_backend, resolve
from . import render
from .application import JsonOpt, guard, sdk_prints_to_stderr, settings

__all__ = ["diff_command", "lineage_command", "ls_command", "projects_command", "runs_command", "show_command",
           "verify_command"]


def _where(text: str | None, s: Settings) -> tuple[Backend, str, str | None]:
    """(the backend, its name, the project) that ``BACKEND://PROJECT[?key=value]``, ``BACKEND``
    or nothing (the settings' backend and project) names."""
    if text is None:
        name, project, query = s.checked_backends()[0], None, ""
    else:
        name, sep, rest = text.strip().partition("://")
        rest, _, query = rest.partition("?")
        project = (rest.strip("/") or None) if sep else None
    if name not in registry.names():
        raise ConfigError(f"unknown backend {name!r} in {text!r}; known backends: {', '.join(registry.names())} "
                          "(write BACKEND://PROJECT, e.g. local://resnet)")
    params = tuple(parse_qsl(query, keep_blank_values=True))
    return open_backend(name, s, Ref(name, params=params)), name, project


def _hook(backend: Backend, method: str, verb: str) -> Any:
    """The backend's optional listing method, or a ConfigError saying what to do without it."""
    found = getattr(backend, method, None)
    if found is None:
        raise ConfigError(f"the {backend.name} backend cannot list {verb} (it has no {method}); name a run "
                          f"directly instead, e.g. ckpt-track ls {backend.name}://...")
    return found


def projects_command(
    backend_name: Annotated[str | None, typer.Argument(
        metavar="BACKEND", help="A backend name such as local or mlflow; default: the configured backend. "
        "BACKEND://?key=value sets its options, e.g. local://?root=/data/ckpts.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the projects (experiments) a backend can see.

    Each row gives the argument for `ckpt-track runs`.  Offline SDK directories count
    for the trackers that have them.

    Examples:

    \b
      ckpt-track projects
      ckpt-track projects mlflow
      ckpt-track projects local://?root=/data/ckpts --json
    """
    with guard(), sdk_prints_to_stderr():
        backend, name, _ = _where(backend_name, settings())
        projects = list(_hook(backend, "list_projects", "projects")())
    if as_json:
        render.print_json([render.project_record(name, p) for p in projects])
        return
    render.out_console().print(render.projects_table(name, projects))


def runs_command(
    where: Annotated[str | None, typer.Argument(
        metavar="BACKEND://PROJECT", help="The project to list, e.g. local://resnet or mlflow://resnet; "
        "default: the configured backend and project.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the runs of a project: name, id, created, last step, best metric, checkpoints.

    The best column is the monitored metric (the monitor setting) of the version
    holding the best alias.  Every run's checkpoints are listed, so on a remote
    tracker this makes one request per run.

    Examples:

    \b
      ckpt-track runs
      ckpt-track runs local://resnet
      ckpt-track runs mlflow://resnet?tracking_uri=http://127.0.0.1:5000 --json
    """
    with guard(), sdk_prints_to_stderr():
        s = settings()
        backend, name, project = _where(where, s)
        project = project or s.project
        infos = _hook(backend, "list_runs", "runs")(project)
        runs = [render.RunRow(info, tuple(sorted(backend.list(info), key=lambda x: x.version))) for info in infos]
    if as_json:
        render.print_json([render.run_record(r, s.monitor) for r in runs])
        return
    render.out_console().print(render.runs_table(f"{name}://{project}", runs, s.monitor))


def ls_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A run reference (a selector, if any, is ignored), "
                                       "or a checkpoint directory.")],
    as_json: JsonOpt = False,
    all_aliases: Annotated[
        bool, typer.Option("--all-aliases", help="Also show the step-N alias every version carries.")
    ] = False,
) -> None:
    """List every checkpoint of a run, oldest version first.

    Examples:

    \b
      ckpt-track ls local://resnet/3k2j1x
      ckpt-track ls local://resnet/3k2j1x --all-aliases --json
    """
    with guard():
        listing = Resolver(settings()).run(ref)
        run, stored = listing.run, list(listing.stored)
    if as_json:
        render.print_json([render.ls_record(s) for s in stored])
        return
    console = render.out_console()
    if not stored:
        console.print(Text(f"{run.ref} has no committed checkpoints yet"))
        return
    console.print(render.ls_table(run, stored, all_aliases))


def _run_config(found: Resolved) -> Mapping[str, Any] | None:
    """The run's training config as its tracker holds it (``ct.init(config=...)``), or None when
    the backend does not report it: a checkpoint records only its hash (lineage ``config_hash``)."""
    hook = getattr(found.backend, "run_config", None)
    return None if hook is None else hook(found.run)


def show_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. "
                                       "local://PROJECT/RUN@best, or a checkpoint directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one checkpoint: metrics, run config, lineage and the files of its manifest.

    The config is the one the run was started with (ct.init(config=...)), as its
    tracker holds it; a checkpoint directory records only its hash.

    Examples:

    \b
      ckpt-track show local://resnet/3k2j1x@best
      ckpt-track show ./best --json
    """
    with guard():
        found = resolve(ref, settings())
        ckpt = found.fetch()
        config = _run_config(found)
    if as_json:
        render.print_json(render.show_record(found, ckpt.manifest, config))
        return
    render.out_console().print(render.show_renderable(found, ckpt, config))


def verify_command(
    ref: Annotated[
        str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. local://PROJECT/RUN@step=500, "
                            "or a checkpoint directory.")
    ],
    all_copies: Annotated[bool, typer.Option("--all-copies", help="With [storage] url and replicas: download and "
                                             "verify the checkpoint from every copy.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every file of a checkpoint against its manifest.

    Exits with 4 and names each missing or modified file when it does not match.

    Examples:

    \b
      ckpt-track verify local://resnet/3k2j1x@best
      ckpt-track verify ./best
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
    ref: Annotated[str, typer.Argument(metavar="REF", help="A checkpoint reference, e.g. "
                                       "local://PROJECT/RUN@best, or a checkpoint directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show where a checkpoint comes from: parents and resumes back to the root, across runs and backends.

    The chain follows each manifest's parent (the previous checkpoint of the run, or
    the checkpoint a run resumed from); a parent that no longer exists ends it.
    --json prints the chain as a list, REF first.

    Examples:

    \b
      ckpt-track lineage local://resnet/3k2j1x@best
      ckpt-track lineage ./swa --json
    """
    with guard(), sdk_prints_to_stderr():
        nodes = lineage(ref, settings=settings())
    if as_json:
        render.print_json([n.to_json() for n in nodes])
        return
    render.out_console().print(render.lineage_tree(nodes))


def diff_command(
    a: Annotated[str, typer.Argument(metavar="REF_A", help="The first checkpoint (A): a reference or a "
                                     "checkpoint directory.")],
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

    Examples:

    \b
      ckpt-track diff local://resnet/3k2j1x:v3 local://resnet/3k2j1x@best
      ckpt-track diff ./best ./swa --prefix model/ --json
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
