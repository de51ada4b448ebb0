"""Every checkpoint reference an example prints restores at the moment it is printed.

``log_checkpoint`` returns before the save is committed, so a script that prints
``handle.ref`` right away shows a reference that a kill at that instant would lose (issue 15,
bug 12).  Each example runs in a subprocess whose ``print`` is wrapped: before a line that
holds a checkpoint reference (``...@step=N``, ``@best``, ``@latest``, ``:vN``) goes out, the
wrapper resolves that reference against the tracker, in the example's own process, and
records whether it was found (in ``refs.jsonl`` of its working directory, or
``$REFCHECK_LOG``).  The Lightning and HF example tests launch their example the same way
(:func:`checked_command`, :func:`unrestorable`), so those run once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"

# runs the example as __main__ with print checking each checkpoint reference first
_WRAPPER = r"""
import builtins, json, os, re, runpy, sys

REF = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"',()]+")
SELECTOR = re.compile(r"(@[A-Za-z0-9_=.-]+|:v\d+)$")
log = open(os.environ.get("REFCHECK_LOG", "refs.jsonl"), "a")
plain = builtins.print


def checking_print(*args, **kwargs):
    from ckpt_track.errors import CkptTrackError
    from ckpt_track.resolve import resolve

    text = (kwargs.get("sep") or " ").join(str(a) for a in args)
    for ref in (r.rstrip(":.;") for r in REF.findall(text)):  # "... {ref}: step 3"
        if not SELECTOR.search(ref):
            continue  # a run reference, not a checkpoint
        try:
            resolve(ref)
            found, error = True, None
        except CkptTrackError as exc:
            found, error = False, str(exc)
        log.write(json.dumps({"ref": ref, "found": found, "error": error}) + "\n")
        log.flush()
    plain(*args, **kwargs)


builtins.print = checking_print
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
    sys.exit(0 if code in (0, 3) else code)  # resume_after_crash exits 3 after --stop-after
"""


def checked_command(script: Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with every printed checkpoint reference checked."""
    return [sys.executable, "-c", _WRAPPER, str(script), *args]


def checked_refs(log: Path) -> list[dict[str, object]]:
    """What the wrapper recorded: one ``{"ref", "found", "error"}`` per printed reference."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def unrestorable(log: Path) -> list[dict[str, object]]:
    """The printed references that did not resolve when they were printed."""
    return [c for c in checked_refs(log) if not c["found"]]


def _run(tmp_path: Path, script: str, *args: str, timeout: int = 300) -> list[dict[str, object]]:
    log = tmp_path / "refs.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_TRACK_")}
    env.update(CKPT_TRACK_LOCAL__ROOT=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               REFCHECK_LOG=str(log))
    done = subprocess.run(checked_command(EXAMPLES / script, *args), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not unrestorable(log)
    return checked_refs(log)


@pytest.mark.slow
def test_switch_backend_prints_each_reference_once_it_is_stored(tmp_path: Path) -> None:
    checked = _run(tmp_path, "switch_backend.py")
    assert [str(c["ref"]).rsplit("@", 1)[1] for c in checked] == ["step=4", "step=8", "step=12"]


@pytest.mark.slow
def test_quickstart_prints_only_restorable_references(tmp_path: Path) -> None:
    checked = _run(tmp_path, "quickstart.py")
    assert [str(c["ref"]).endswith("@best") for c in checked] == [False, True]  # the restored one, `ls ...@best`
