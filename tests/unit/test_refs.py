from __future__ import annotations

import pytest

from ckpt_track import InvalidRef, Ref, parse_ref

CANONICAL = [
    ("local://resnet/3k2j1x", Ref("local", "resnet/3k2j1x")),
    ("local://resnet/3k2j1x@latest", Ref("local", "resnet/3k2j1x", alias="latest")),
    ("local://resnet/3k2j1x@best", Ref("local", "resnet/3k2j1x", alias="best")),
    ("local://resnet/3k2j1x@step=500", Ref("local", "resnet/3k2j1x", step=500)),
    ("local://resnet/3k2j1x@step-500", Ref("local", "resnet/3k2j1x", alias="step-500")),
    ("local://resnet/3k2j1x:v7", Ref("local", "resnet/3k2j1x", version=7)),
    ("local://resnet/3k2j1x@best?root=/data/ckpts", Ref("local", "resnet/3k2j1x", alias="best", params=(("root", "/data/ckpts"),))),
    ("mlflow://0f1e2d3c4b5a69788796a5b4c3d2e1f0@step=3000", Ref("mlflow", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", step=3000)),
    ("wandb://acme/resnet/3k2j1x:v12", Ref("wandb", "acme/resnet/3k2j1x", version=12)),
    ("clearml://4a1b2c3d4e5f60718293a4b5c6d7e8f9@best", Ref("clearml", "4a1b2c3d4e5f60718293a4b5c6d7e8f9", alias="best")),
    ("comet://acme/resnet/9f8e7d6c5b4a39281706f5e4d3c2b1a0@latest", Ref("comet", "acme/resnet/9f8e7d6c5b4a39281706f5e4d3c2b1a0", alias="latest")),
]


@pytest.mark.parametrize("text,expected", CANONICAL)
def test_canonical_forms_parse_and_round_trip(text: str, expected: Ref) -> None:
    ref = parse_ref(text)
    assert ref == expected
    assert str(ref) == text
    assert parse_ref(str(ref)) == ref


def test_ref_is_frozen_and_hashable() -> None:
    ref = parse_ref("local://p/r@best")
    with pytest.raises(AttributeError):
        ref.step = 3  # type: ignore[misc]
    assert {ref: 1}[parse_ref("local://p/r@best")] == 1


def test_helpers() -> None:
    ref = parse_ref("local://p/r@step=5?root=/x")
    assert ref.run_ref() == Ref("local", "p/r", params=(("root", "/x"),))
    assert ref.select(version=2).selector == ":v2"
    assert ref.param("root") == "/x" and ref.segments == ("p", "r")
    assert str(ref.with_params({"a": "b c"})) == "local://p/r@step=5?a=b%20c&root=/x"
    assert parse_ref(str(ref.with_params({"a": "b c"}))).param("a") == "b c"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "resnet/3k2j1x",
        "local:/p/r",
        "local://p/r@",
        "local://p/r@step=abc",
        "local://p/r@step=-1",
        "local://p/r:v0",
        "local://p/r:vx",
        "local://p/r@best@latest",
        "local://p/r@be st",
        "local://p//r",
        "nosuchbackend://p/r",
        "https://example.com/some/page",
    ],
)
def test_malformed_refs_raise_one_line_invalid_ref(text: str) -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref(text)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.endswith("(see `ckpt-track refs` for every form)"), message
    assert isinstance(info.value, ValueError)


def test_invalid_ref_points_to_the_refs_verb_not_a_list() -> None:
    with pytest.raises(InvalidRef) as info:
        parse_ref("not a ref")
    message = str(info.value)
    assert message == ("cannot parse checkpoint reference 'not a ref': not a reference form ckpt_track knows, "
                       "e.g. local://<project>/<run>@best (see `ckpt-track refs` for every form)")


def test_one_selector_only() -> None:
    with pytest.raises(InvalidRef):
        Ref("local", "p/r", step=1, alias="best")
