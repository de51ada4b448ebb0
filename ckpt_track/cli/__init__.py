"""The ``ckpt-track`` command line: inspect, verify and restore stored checkpoints.

- :mod:`.application`: the Typer app, the error contract (messages, exit codes), the entry point
- :mod:`.inspect`: the read-only verbs (``projects``, ``runs``, ``ls``, ``show``, ``verify``, ``lineage``, ``diff``)
- :mod:`.manage`: the verbs that write or delete (``restore``, ``gc``, ``copy``, ``average``)
- :mod:`.render`: what every verb prints, tables and ``--json`` alike (:mod:`.render_manage` for ``gc``, ``copy``, ``average``)
- :mod:`.refs_help`: ``ckpt-track refs``, every reference form

The verbs are registered here, in the order ``--help`` lists them; importing any module of
this package (the console script imports :func:`main`) imports this one first.
"""

from __future__ import annotations

from ..restoring import restore_into
from . import inspect, manage, refs_help
from .application import EXIT_CODES, Command, app, exit_code, main
from .render import human_size

__all__ = ["EXIT_CODES", "app", "exit_code", "human_size", "main", "restore_into"]

for _name, _command in (
    ("projects", inspect.projects_command),
    ("runs", inspect.runs_command),
    ("ls", inspect.ls_command),
    ("show", inspect.show_command),
    ("verify", inspect.verify_command),
    ("restore", manage.restore_command),
    ("lineage", inspect.lineage_command),
    ("diff", inspect.diff_command),
    ("gc", manage.gc_command),
    ("copy", manage.copy_command),
    ("average", manage.average_command),
    ("refs", refs_help.refs_command),
):
    app.command(_name, cls=Command)(_command)
