"""The decisions every backend takes from the core (``plan``, ``options``, ``cache``), tested
once here instead of five times in the backends."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import overwrite

from ckpt_track.cache import fetch
from ckpt_track.errors import CheckpointNotFound, ConfigError, IntegrityError
from ckpt_track.format import MANIFEST, is_blob, verify, write_checkpoint
from ckpt_track.options import option_names, parse_bool, parse_options
from ckpt_track.plan import AliasTable, by_name, files_to_send, next_version, resume_decision, unreferenced
from ckpt_track.records import RunSpec


def _blob_ckpt(parent: Path, name: str, changed: float = 0.0):
    tensors = {f"w{i}": torch.full((32768,), float(i)) for i in range(3)}
    tensors["w1"] = tensors["w1"] + changed
    return write_checkpoint(parent, name, tensors, {"step": 1}, step=1, blobs=True, pack_size=64 * 1024)


# -- plan ------------------------------------------------------------------------------------
def test_next_version_is_above_every_version_and_the_high_water_mark() -> None:
    assert next_version([]) == 1
    assert next_version([1, 2, 3]) == 4
    assert next_version([1, 2], high_water=5) == 6  # v3..v5 were deleted: never reused
    assert next_version([7], high_water=3) == 8


def test_files_to_send_skips_only_blobs_the_run_holds_at_that_size(tmp_path: Path) -> None:
    ckpt = _blob_ckpt(tmp_path, "a")
    blobs = [f for f in ckpt.manifest.files if is_blob(f)]
    others = [f for f in ckpt.manifest.files if not is_blob(f)]
    assert files_to_send(ckpt.manifest, {}) == list(ckpt.manifest.files)
    held = {f: ckpt.manifest.files[f].size for f in blobs}
    assert files_to_send(ckpt.manifest, held) == others  # state.json is always sent
    held[blobs[0]] += 1  # held at another size: damaged or another file, send again
    assert files_to_send(ckpt.manifest, held) == [f for f in ckpt.manifest.files if f not in blobs[1:]]
    held[blobs[0]] = None  # size unknown to the tracker: sent again (a partial upload is never "held")
    assert files_to_send(ckpt.manifest, held) == [f for f in ckpt.manifest.files if f not in blobs[1:]]


def test_unreferenced_keeps_every_file_a_remaining_version_names() -> None:
    assert unreferenced(["a", "b", "c"], [["a"], ["a", "c"]]) == ["b"]
    assert unreferenced(["a"], []) == ["a"]


@pytest.mark.parametrize(("resume", "exists", "expected"), [
    ("auto", True, "attach"), ("auto", False, "create"), ("must", True, "attach"),
    ("never", False, "create"), ("never", True, ConfigError), ("must", False, CheckpointNotFound),
])
def test_resume_decision(resume: str, exists: bool, expected: object) -> None:
    spec = RunSpec(project="p", name="n", resume=resume)  # type: ignore[arg-type]
    if isinstance(expected, str):
        assert resume_decision(spec, exists, what="run 'n'", missing=lambda: "nowhere") == expected
    else:
        with pytest.raises(expected, match="resume='never'|nowhere"):  # type: ignore[call-overload]
            resume_decision(spec, exists, what="run 'n'", missing=lambda: "nowhere")


def test_resume_must_without_a_name_or_id_says_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="needs run_id= or name="):
        resume_decision(RunSpec(project="p", resume="must"), False, what="run", missing=lambda: "x")
    assert by_name(RunSpec(project="p", name="n")) and not by_name(RunSpec(project="p", name="n", resume="never"))
    assert not by_name(RunSpec(project="p", name="n", run_id="r"))


def test_alias_table_moves_an_alias_and_forgets_a_deleted_version() -> None:
    table = AliasTable({"best": 1}).point(["best", "latest"], 2).point(["step-3"], 3)
    assert table.of(2) == ("best", "latest") and table.of(1) == ()
    assert table.without(2).as_dict() == {"step-3": 3}


# -- options ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Opts:
    url: str | None = None
    online: bool = True
    retries: int = 3


def test_options_are_typed_and_typos_get_a_suggestion() -> None:
    assert option_names(_Opts) == {"url", "online", "retries"}
    got = parse_options(_Opts, {"url": "", "online": "off", "retries": "5"}, backend="demo")
    assert got == _Opts(url=None, online=False, retries=5)
    with pytest.raises(ConfigError, match=r"demo backend: unknown option\(s\) \['onlien'\].*Did you mean 'online'"):
        parse_options(_Opts, {"onlien": True}, backend="demo")
    with pytest.raises(ConfigError, match=r"\[demo\] retries must be an integer"):
        parse_options(_Opts, {"retries": "many"}, backend="demo")


@pytest.mark.parametrize(("raw", "value"), [(True, True), ("yes", True), (" ON ", True), ("0", False),
                                             ("false", False), (False, False)])
def test_parse_bool(raw: object, value: bool) -> None:
    assert parse_bool(raw, "x") is value


def test_parse_bool_refuses_anything_else() -> None:
    with pytest.raises(ConfigError, match="x must be true or false"):
        parse_bool("maybe", "x")


# -- cache -----------------------------------------------------------------------------------
class _Tracker:
    """A tracker holding one run's versions: own files per version, blobs once."""

    def __init__(self, *ckpts) -> None:  # type: ignore[no-untyped-def]
        self.ckpts = ckpts
        self.fetched: list[str] = []

    def own(self, i: int):  # type: ignore[no-untyped-def]
        def write(into: Path) -> None:
            for f in [*self.ckpts[i].manifest.files, MANIFEST]:
                if not is_blob(f):
                    self.fetched.append(f)
                    shutil.copyfile(self.ckpts[i].path / f, into / f)
        return write

    def blobs(self, i: int):  # type: ignore[no-untyped-def]
        def write(names, into: Path) -> None:  # type: ignore[no-untyped-def]
            for f in names:
                self.fetched.append(f)
                shutil.copyfile(self.ckpts[i].path / f, into / f)
        return write


def test_fetch_reuses_a_verified_copy_and_links_what_another_version_holds(tmp_path: Path) -> None:
    a, b = _blob_ckpt(tmp_path / "src", "a"), _blob_ckpt(tmp_path / "src", "b", changed=1.0)
    tracker = _Tracker(a, b)
    cache = tmp_path / "cache" / "run"
    fetch(cache / "v000001", tracker.own(0), tracker.blobs(0))
    assert sum(is_blob(f) for f in tracker.fetched) == 3
    tracker.fetched.clear()
    fetch(cache / "v000001", tracker.own(0), tracker.blobs(0))
    assert tracker.fetched == []  # verified cached copy: nothing fetched
    got = fetch(cache / "v000002", tracker.own(1), tracker.blobs(1))
    verify(got.path)
    assert [f for f in tracker.fetched if is_blob(f)] == [f for f in b.manifest.files if is_blob(f)
                                                           and f not in a.manifest.files]  # only w1's file


def test_fetch_replaces_a_damaged_copy_and_a_failure_leaves_the_entry_as_it_was(tmp_path: Path) -> None:
    a = _blob_ckpt(tmp_path / "src", "a")
    tracker = _Tracker(a)
    dest = tmp_path / "cache" / "v000001"
    fetch(dest, tracker.own(0), tracker.blobs(0))
    blob = next(f for f in a.manifest.files if is_blob(f))
    overwrite(dest / blob, b"damaged")
    fetch(dest, tracker.own(0), tracker.blobs(0))
    verify(dest)  # fetched again

    def broken(names, into):  # type: ignore[no-untyped-def]
        raise OSError("connection reset")

    overwrite(dest / blob, b"damaged again")
    with pytest.raises(OSError, match="connection reset"):
        fetch(dest, tracker.own(0), broken)
    assert (dest / blob).read_bytes() == b"damaged again"  # untouched: no half-swapped entry
    assert [p.name for p in dest.parent.iterdir()] == ["v000001"]  # no staging left behind


def test_fetch_without_a_way_to_get_shared_files_names_them(tmp_path: Path) -> None:
    a = _blob_ckpt(tmp_path / "src", "a")
    with pytest.raises(IntegrityError, match="missing from the downloaded checkpoint"):
        fetch(tmp_path / "cache" / "v1", _Tracker(a).own(0), None, where="demo://run:v1")


def test_a_directory_option_may_be_a_path_and_a_boolean_may_be_0_or_1() -> None:
    @dataclass(frozen=True)
    class Dirs:
        root: str | None = None
        offline: bool = False

    assert parse_options(Dirs, {"root": Path("/data/ckpts"), "offline": 1}, backend="demo") == Dirs("/data/ckpts", True)
