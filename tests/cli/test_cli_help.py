"""``ckpt-track --help`` and each verb's help: every sentence printed whole (no text lost to
markup, no word broken at 80 columns), placeholders by name, an Examples block, completion."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from ckpt_track.cli import app

_GROUP = typer.main.get_command(app)
VERBS = sorted(_GROUP.commands)  # type: ignore[attr-defined]


def _help(*args: str, columns: int = 80) -> str:
    # the width a terminal of ``columns`` gives (the real COLUMNS variable: see the last test)
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=columns)
    assert result.exit_code == 0, result.output
    return result.stdout


def _words(text: str) -> str:
    return " ".join(text.split())


def _written(command: object) -> list[str]:
    """Every prose paragraph and parameter help of a command, as written in the source."""
    texts = [p for p in (getattr(command, "help", "") or "").split("\n\n") if not p.lstrip().startswith("\b")]
    texts += [p.help for p in getattr(command, "params", ()) if getattr(p, "help", None)]
    return [_words(t) for t in texts if t.strip()]


def test_every_verb_is_listed() -> None:
    assert {"projects", "runs", "ls", "show", "verify", "restore", "lineage", "diff", "gc", "copy",
            "average"} <= set(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_help_prints_every_sentence_whole_at_80_columns(verb: str) -> None:
    out = _help(verb)
    printed = _words(out)
    for text in _written(_GROUP.commands[verb]):  # type: ignore[attr-defined]
        # a word broken across lines ("object-" / "store") or text eaten as markup fails here
        assert text in printed, f"{verb} --help lost or broke: {text!r}\n{out}"
    assert all(len(line) <= 80 for line in out.splitlines()), out


@pytest.mark.parametrize("verb", VERBS)
def test_placeholders_are_names_not_types(verb: str) -> None:
    out = _help(verb)
    for typed in ("<bool>", "<str>", "<int>", "<float>", "<path>", "{"):
        assert typed not in out, f"{verb} --help shows {typed!r}:\n{out}"
    usage = out.splitlines()[0]
    assert usage.startswith(f"Usage: ckpt-track {verb} [OPTIONS]"), usage


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_examples(verb: str) -> None:
    out = _help(verb)
    assert "Examples:" in out, out
    after = out.split("Examples:", 1)[1].splitlines()
    examples = [line for line in after if line.startswith("    ckpt-track ")]
    assert examples, out
    assert any(f"ckpt-track {verb}" in line for line in examples), out


def test_gc_help_keeps_square_brackets() -> None:
    out = _words(_help("gc"))
    assert "The --keep-* options replace the rules of [retention] in ckpt_track.toml" in out
    assert "(default: [retention] metric, then monitor)" in out
    assert "--keep-best" in out and "--keep-\n" not in _help("gc")


def test_help_text_reflows_to_a_narrow_terminal() -> None:
    wide, narrow = _help("copy", columns=120), _help("copy", columns=60)
    assert _words(wide) == _words(narrow)  # the same words, only the line breaks move
    assert max(len(line) for line in narrow.splitlines() if not line.startswith("    ckpt-track")) <= 60


@pytest.mark.parametrize("columns", [80, 60])
def test_the_columns_variable_sets_the_width(columns: int) -> None:
    env = {**os.environ, "COLUMNS": str(columns)}
    out = subprocess.run([sys.executable, "-m", "ckpt_track.cli", "gc", "--help"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    prose = [line for line in out.splitlines() if not line.startswith("    ckpt-track")]
    assert max(map(len, prose)) <= columns
    assert "[retention] in ckpt_track.toml" in _words(out)


def test_root_help_offers_shell_completion() -> None:
    out = _help()
    assert "--install-completion" in out and "--show-completion" in out
    assert "Examples:" in out
    result = CliRunner().invoke(app, ["--show-completion", "bash"], env={"SHELL": "/bin/bash"})
    assert result.exit_code == 0, result.output
    assert "_ckpt_track_completion" in result.stdout
