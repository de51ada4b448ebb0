"""A mistyped reference gets one line with a did-you-mean (issue 15: ``lcoal://`` -> ``local://``,
``@bset`` -> ``@best``, ``mlfow://`` -> ``mlflow://``), and ``ckpt-track refs`` lists every form."""

from __future__ import annotations

import pytest
from typer import Typer
from typer.testing import CliRunner

from ckpt_track import InvalidRef, Ref, parse_ref
from ckpt_track.cli.refs_help import EXAMPLES, refs_command

RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
HINT = "(see `ckpt-track refs` for every form)"


@pytest.mark.parametrize(("text", "meant"), [
    ("lcoal://p/r", "local://p/r"),
    ("locl://p/r@best", "local://p/r@best"),
    (f"mlfow://{RUN}", f"mlflow://{RUN}"),
    ("wnadb://acme/resnet/3k2j1x:v2", "wandb://acme/resnet/3k2j1x:v2"),
    ("comte://acme/resnet/x@latest", "comet://acme/resnet/x@latest"),
    ("local://p/r@bset", "local://p/r@best"),
    ("local://p/r@Best", "local://p/r@best"),
    ("local://p/r@lateset", "local://p/r@latest"),
    ("local://p/r@latset", "local://p/r@latest"),
    ("local://p/r@lates", "local://p/r@latest"),
    ("local://p/r@setp=5", "local://p/r@step=5"),
    ("local://p/r@Step=5", "local://p/r@step=5"),
    ("local://p/r:V3", "local://p/r:v3"),
    ("local://p/r:3", "local://p/r:v3"),
    ("local://p/r:best", "local://p/r@best"),
    ("lcoal://p/r@bset?root=/data", "local://p/r@best?root=/data"),
    ("wandb-artifcat://acme/resnet/ckpt-3k2j1x:v1", "wandb-artifact://acme/resnet/ckpt-3k2j1x:v1"),
])
def test_a_typo_gets_one_line_with_did_you_mean(text: str, meant: str) -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref(text)
    message = str(info.value)
    assert "\n" not in message
    assert f"did you mean {meant!r}?" in message, message
    assert message.endswith(HINT)
    parse_ref(meant)  # what is suggested parses


@pytest.mark.parametrize(("text", "why"), [
    ("local://p/r@step=abc", "step must be a non-negative integer, e.g. @step=500"),
    ("local://p/r@step=-1", "step must be a non-negative integer"),
    ("local://p/r:v0", "versions start at v1"),
    ("local://p/r:vx", "a version is written :v<N>"),
    ("local://p/r@", "nothing after '@'"),
    ("local://p/r@best:v2", "not several"),
    ("nosuch://p/r", "unknown backend 'nosuch'; known: local, mlflow"),
    ("proj/run1@best", "not a reference form ckpt_track knows, e.g. local://<project>/<run>@best"),
])
def test_a_bad_reference_says_why_in_one_line(text: str, why: str) -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref(text)
    message = str(info.value)
    assert "\n" not in message and why in message and message.endswith(HINT), message
    assert "did you mean" not in message  # nothing close enough to suggest


@pytest.mark.parametrize("alias", ["test", "last", "best2", "beta", "rest", "late", "champion", "step5"])
def test_words_of_their_own_stay_aliases(alias: str) -> None:
    assert parse_ref(f"local://p/r@{alias}").alias == alias


def test_a_backend_message_ends_with_the_hint_too() -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref("https://wandb.ai/acme/resnet/reports/abc")
    assert "not a W&B run or model artifact page" in str(info.value)
    assert str(info.value).endswith(HINT) and "\n" not in str(info.value)


def test_a_typo_alias_is_refused_in_typed_text_only() -> None:
    with pytest.raises(InvalidRef, match="typo of @best"):
        Ref.parse("local://p/r@bset")
    assert Ref("local", "p/r", alias="beast").alias == "beast"  # an alias given in code is the user's word


def _app() -> Typer:
    app = Typer()
    app.command("refs")(refs_command)
    app.command("other")(lambda: None)  # two commands: typer keeps "refs" a sub-command
    return app


def test_refs_verb_prints_every_form_with_an_example_that_parses() -> None:
    result = CliRunner().invoke(_app(), ["refs"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for backend, example, _ in EXAMPLES:
        assert example in result.output
        for text in example.split():  # "models:/a/3   models:/a@x": two forms in one row
            assert parse_ref(text).backend == backend, text
    for word in ("@latest", "@best", "@step=N", ":vN", "@<alias>", "?key=value"):
        assert word in result.output
    assert {b for b, _, _ in EXAMPLES} == {"local", "mlflow", "wandb", "clearml", "comet"}
    assert "[selector]" in result.output  # printed literally, not eaten as rich markup
