"""Tampered and damaged checkpoints.

* A restore either fully succeeds or leaves every target exactly as it was: weights,
  optimizer and scheduler state, and the python, torch and numpy generators.
* Any single-byte change to any file of a checkpoint, manifest.json included, is detected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import overwrite, writable
from safetensors import SafetensorError
from typer.testing import CliRunner

import ckpt_track as ct
import ckpt_track.format as fmt
import ckpt_track.format.read as fmt_read
from ckpt_track.cli import app
from ckpt_track.errors import CkptTrackError, IntegrityError
from ckpt_track.format import MANIFEST, STATE, hash_file, read_manifest, verify

TAG = "__ct__"


# -- a run with every kind of state -------------------------------------------------------
def _objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _logged(tmp_path: Path, **settings: Any) -> tuple[ct.Run, Path]:
    run = ct.init(project="p", name="r", backend="local",
                  settings={"local": {"root": str(tmp_path / "store")}, **settings})
    model, opt, sched = _objects(0)
    random.seed(1)
    np.random.seed(1)
    run.log_checkpoint(3, model=model, optimizer=opt, scheduler=sched, metrics={"val/loss": 0.25}, epoch=1,
                       blocking=True)
    run.finish()
    return run, Path(run.checkpoints()[-1].native.path)


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    def split(sd: Any) -> tuple[dict[str, torch.Tensor], str]:
        tensors: dict[str, torch.Tensor] = {}

        def walk(x: Any, name: str) -> Any:
            if isinstance(x, torch.Tensor):
                tensors[name] = x.detach().clone()
                return "<tensor>"
            if isinstance(x, dict):
                return {str(k): walk(v, f"{name}/{k}") for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [type(x).__name__, [walk(v, f"{name}/{i}") for i, v in enumerate(x)]]
            return x

        return tensors, repr(walk(sd, ""))

    np_state = np.random.get_state()
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "opt": split(opt.state_dict()),
        "sched": sched.state_dict(),
        "python": random.getstate(),
        "torch": torch.get_rng_state().clone(),
        "numpy": (np_state[0], np_state[1].copy(), *np_state[2:]),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "model weights changed"
    assert a["opt"][1] == b["opt"][1], "optimizer state (non-tensor part) changed"
    assert a["opt"][0].keys() == b["opt"][0].keys()
    assert all(torch.equal(a["opt"][0][k], b["opt"][0][k]) for k in a["opt"][0]), "optimizer tensors changed"
    assert a["sched"] == b["sched"], "scheduler state changed"
    assert a["python"] == b["python"], "python RNG changed"
    assert torch.equal(a["torch"], b["torch"]), "torch RNG changed"
    assert a["numpy"][0] == b["numpy"][0] and np.array_equal(a["numpy"][1], b["numpy"][1]) \
        and a["numpy"][2:] == b["numpy"][2:], "numpy RNG changed"


def reseal_state(vdir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit state.json and record its new size and hash in a manifest with a valid digest: a
    consistent hostile checkpoint, refused only by the state checks."""
    state = json.loads((vdir / STATE).read_text())
    change(state)
    raw = fmt.canonical_json(state)
    overwrite(vdir / STATE, raw)
    data = json.loads((vdir / MANIFEST).read_text())
    data.pop("manifest_hash")
    data["files"][STATE] = {"size": len(raw), "hash": hash_file(vdir / STATE)}
    data["manifest_hash"] = fmt.manifest_digest(data)
    overwrite(vdir / MANIFEST, fmt.canonical_json(data))


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _set_group(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda s: s["optimizer"]["param_groups"][0].__setitem__(key, value)


def _python_rng(change: Callable[[list[Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(s: dict[str, Any]) -> None:
        change(s["rng"]["python"]["items"])
    return edit


BAD_STATES: dict[str, Callable[[dict[str, Any]], None]] = {
    "step-nan": lambda s: s.__setitem__("step", float("nan")),
    "step-inf": lambda s: s.__setitem__("step", float("inf")),
    "step-negative": lambda s: s.__setitem__("step", -1),
    "step-string": lambda s: s.__setitem__("step", "3"),
    "epoch-float": lambda s: s.__setitem__("epoch", 1.5),
    "python-rng-short": _python_rng(lambda items: items[1]["items"].__delitem__(slice(10, None))),
    "python-rng-out-of-range": _python_rng(lambda items: items[1]["items"].__setitem__(0, 2**40)),
    "python-rng-gauss-string": _python_rng(lambda items: items.__setitem__(2, "x")),
    "python-rng-not-a-triple": lambda s: s["rng"].__setitem__("python", [1, 2]),
    "torch-rng-wrong-tensor": lambda s: s["rng"].__setitem__("torch", {TAG: "tensor", "name": "model/0.weight"}),
    "numpy-rng-short": lambda s: s["rng"]["numpy"].__setitem__(1, s["rng"]["numpy"][1][:600]),
    "numpy-rng-negative-key": lambda s: s["rng"]["numpy"][1].__setitem__(0, -1),
    "cuda-rng-not-a-list": lambda s: s["rng"].__setitem__("cuda", "x"),
    "extra-900-deep": lambda s: s.__setitem__("extra", {"deep": _nested(900)}),
    "extra-not-an-object": lambda s: s.__setitem__("extra", [1, 2]),
    "tensor-ref-missing": lambda s: s["rng"].__setitem__("torch", {TAG: "tensor", "name": "nope"}),
    "bad-tag-items": lambda s: s["optimizer"].__setitem__("state", {TAG: "dict", "items": [[1]]}),
    "opt-lr-string": _set_group("lr", "abc"),
    "opt-lr-null": _set_group("lr", None),
    "opt-betas-list": _set_group("betas", [0.9, 0.999]),
    "opt-betas-short": _set_group("betas", {TAG: "tuple", "items": [0.9]}),
    "opt-amsgrad-number": _set_group("amsgrad", 1),
    "opt-eps-missing": lambda s: s["optimizer"]["param_groups"][0].pop("eps"),
    "opt-params-strings": _set_group("params", ["a", "b", "c", "d"]),
    "sched-gamma-string": lambda s: s["scheduler"].__setitem__("gamma", "abc"),
    "sched-step-size-missing": lambda s: s["scheduler"].pop("step_size"),
    "sched-foreign-key": lambda s: s["scheduler"].__setitem__("T_max", 10),
    "sched-base-lrs-long": lambda s: s["scheduler"].__setitem__("base_lrs", [0.01, 0.02]),
}


@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_a_restore_that_fails_changes_nothing(tmp_path: Path, name: str) -> None:
    run, vdir = _logged(tmp_path)
    reseal_state(vdir, BAD_STATES[name])
    verify(vdir)  # consistent: every hash matches, only the state checks can refuse it
    model, opt, sched = _objects(7)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    before = _snapshot(model, opt, sched)
    with pytest.raises(CkptTrackError) as info:
        ct.restore(run.ref, model=model, optimizer=opt, scheduler=sched, settings=run.settings)
    assert "\n" not in str(info.value)
    _assert_same(before, _snapshot(model, opt, sched))


def test_an_intact_restore_still_restores_everything(tmp_path: Path) -> None:
    run, _ = _logged(tmp_path)
    saved_model, saved_opt, saved_sched = _objects(0)
    model, opt, sched = _objects(7)
    restored = ct.restore(run.ref, model=model, optimizer=opt, scheduler=sched, settings=run.settings)
    assert restored.step == 3 and restored.epoch == 1 and restored.metrics == {"val/loss": 0.25}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved_model.state_dict().values()))
    assert sched.state_dict() == saved_sched.state_dict()
    assert opt.param_groups[0]["lr"] == saved_opt.param_groups[0]["lr"]
    assert type(opt.param_groups[0]["betas"]) is tuple


def test_a_file_the_fast_reader_cannot_map_is_read_before_any_live_tensor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tensor file per tensor; the file holding the int64 counter goes through safetensors
    (its dtype unmapped here) and fails: no live tensor may have been written by then."""
    run, vdir = _logged(tmp_path, shard_size=1, incremental=False)
    assert len(list(vdir.glob("*.safetensors"))) > 3
    monkeypatch.setattr(fmt_read, "_ST_DTYPES", {k: v for k, v in fmt_read._ST_DTYPES.items() if k != "I64"})

    def broken(data: bytes) -> dict[str, torch.Tensor]:
        raise SafetensorError("simulated: this file cannot be read")

    monkeypatch.setattr(fmt_read, "load_safetensors_bytes", broken)
    model, opt, sched = _objects(7)
    before = _snapshot(model, opt, sched)
    with pytest.raises(IntegrityError, match="nothing was loaded"):
        ct.restore(run.ref, model=model, optimizer=opt, scheduler=sched, settings=run.settings)
    _assert_same(before, _snapshot(model, opt, sched))
    monkeypatch.undo()
    ct.restore(run.ref, model=model, optimizer=opt, scheduler=sched, settings=run.settings)


def test_an_unmapped_dtype_restores_through_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = _logged(tmp_path, shard_size=1, incremental=False)
    monkeypatch.setattr(fmt_read, "_ST_DTYPES", {k: v for k, v in fmt_read._ST_DTYPES.items() if k != "I64"})
    saved_model, _, _ = _objects(0)
    model, opt, sched = _objects(7)
    ct.restore(run.ref, model=model, optimizer=opt, scheduler=sched, settings=run.settings)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved_model.state_dict().values()))


# -- every byte of every file -------------------------------------------------------------
def _flip(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte in place (twice restores it)."""
    with open(path, "r+b") as f:  # made writable by the caller
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _detected(vdir: Path) -> bool:
    try:
        verify(vdir)
    except IntegrityError:
        return True
    return False


def _positions(size: int, count: int = 300, head: int = 120) -> list[int]:
    spread = {round(i * (size - 1) / (count - head - 1)) for i in range(count - head)}
    return sorted(set(range(min(head, size))) | spread)


def test_every_single_byte_change_is_detected(tmp_path: Path) -> None:
    _, vdir = _logged(tmp_path)
    files = {MANIFEST: None, STATE: None, **{p.name: _positions(p.stat().st_size) for p in vdir.glob("*.safetensors")}}
    tried = caught = 0
    missed: list[tuple[str, int]] = []
    for fname, positions in files.items():
        path = writable(vdir / fname)
        for offset in positions if positions is not None else range(path.stat().st_size):
            _flip(path, offset)
            try:
                tried += 1
                if _detected(vdir):
                    caught += 1
                else:
                    missed.append((fname, offset))
            finally:
                _flip(path, offset)
    verify(vdir)
    assert tried > 2000 and caught == tried, missed[:20]


@pytest.mark.parametrize("edit", [
    lambda d: d.__setitem__("step", 4), lambda d: d.__setitem__("epoch", 2),
    lambda d: d["metrics"].__setitem__("val/loss", 0.1), lambda d: d.__setitem__("created", "2020-01-01T00:00:00"),
    lambda d: d["lineage"].__setitem__("parent", "local://p/x@step=1"), lambda d: d.__setitem__("extra_key", 1),
], ids=["step", "epoch", "metrics", "created", "lineage", "added-key"])
def test_semantic_edits_of_the_manifest_are_detected(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    _, vdir = _logged(tmp_path)
    data = json.loads((vdir / MANIFEST).read_text())
    edit(data)
    overwrite(vdir / MANIFEST, fmt.canonical_json(data))  # canonical bytes, stale digest
    with pytest.raises(IntegrityError, match="manifest_hash"):
        read_manifest(vdir)


def test_a_whitespace_edit_of_the_manifest_is_detected(tmp_path: Path) -> None:
    _, vdir = _logged(tmp_path)
    raw = (vdir / MANIFEST).read_bytes()
    overwrite(vdir / MANIFEST, raw.replace(b'"step": 3', b'"step":  3'))
    with pytest.raises(IntegrityError, match="manifest_hash"):
        read_manifest(vdir)


def test_the_v1_sample_without_a_digest_still_reads() -> None:
    sample = Path(__file__).resolve().parents[1] / "data" / "format_v1" / "sample"
    manifest = verify(sample)
    assert manifest.manifest_hash is None and manifest.step == 7


def test_a_re_serialized_manifest_stays_valid(tmp_path: Path) -> None:
    _, vdir = _logged(tmp_path)
    manifest = read_manifest(vdir)
    overwrite(vdir / MANIFEST, fmt.canonical_json(manifest.to_json()))
    assert read_manifest(vdir) == manifest and read_manifest(vdir).manifest_hash == manifest.manifest_hash


def test_cli_verify_of_a_damaged_manifest_exits_4_with_one_error_line(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run, vdir = _logged(tmp_path)
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    raw = (vdir / MANIFEST).read_bytes()
    for damaged in (raw.replace(b'"step": 3', b'"step": 4'), raw[:-5], b"\xff" + raw[1:]):
        overwrite(vdir / MANIFEST, damaged)
        for ref in (str(run.ref), f"{run.ref}:v1", f"{run.ref}@step=3"):
            result = CliRunner().invoke(app, ["verify", ref])
            assert result.exit_code == 4, (ref, result.output)
            assert "Traceback" not in result.output and result.exception is None or \
                isinstance(result.exception, SystemExit), result.exception
            errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, result.stderr
    overwrite(vdir / MANIFEST, raw)
    assert CliRunner().invoke(app, ["verify", str(run.ref)]).exit_code == 0


def test_cli_prints_one_line_for_a_nul_byte_in_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = _logged(tmp_path)
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    # in --output, the command line parser itself refuses it (a usage error)
    result = CliRunner().invoke(app, ["restore", str(run.ref), "-o", str(tmp_path / "a\x00b")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    # in a reference: refused with the contract's error line
    result = CliRunner().invoke(app, ["verify", f"{run.ref}?root={tmp_path}/a%00b"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), result.stderr


@pytest.mark.parametrize("error", [ValueError("embedded null byte"), RecursionError("too deep"),
                                   IntegrityError("x is damaged"), OSError(28, "No space left on device")])
def test_cli_guard_turns_errors_into_one_line(error: BaseException, capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from ckpt_track.cli.application import guard

    with pytest.raises(typer.Exit) as info, guard():
        raise error
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert info.value.exit_code == {ValueError: 2, RecursionError: 2, IntegrityError: 4, OSError: 1}[type(error)]


# every store that keeps versions on local disk: the local backend, W&B's offline store (its
# "disabled" mode uses it without the SDK's record log) and Comet's offline mirror
STORES = {
    "local": ({}, "ckpt_runs/p/*/checkpoints/v000002"),
    "wandb": ({"backend": "wandb", "wandb": {"mode": "disabled", "dir": "wb"}}, "wb/wandb/ckpt_track/p/*/v000002"),
    "comet": ({"backend": "comet", "comet": {"online": False, "offline_directory": "off", "workspace": "ws"}},
              "off/ckpt_track/*/v000002"),
}


@pytest.mark.parametrize("store", sorted(STORES))
def test_a_damaged_manifest_is_an_integrity_error_through_the_api_never_another_version(
        store: str, tmp_path: Path) -> None:
    """``@latest`` (or no selector, or ``:v2``) on a run whose newest manifest was damaged raises
    IntegrityError; it never silently restores the older intact version instead."""
    from ckpt_track.errors import IntegrityError as Damaged

    if store != "local":
        pytest.importorskip({"wandb": "wandb", "comet": "comet_ml"}[store])
    settings, pattern = STORES[store]
    with ct.init(project="p", name="dm", monitor=None, settings=settings) as run:
        for step in (1, 2):
            run.log_checkpoint(step, model=torch.nn.Linear(3, 3))
    v2 = next(Path().glob(pattern))
    raw = bytearray((v2 / "manifest.json").read_bytes())
    raw[raw.index(b'"step": 2') + 8] = ord("7")  # the step edited: 2 -> 7
    overwrite(v2 / "manifest.json", bytes(raw))
    loaded = ct.load_settings(settings)
    for ref in (run.ref, run.ref.select(alias="latest"), run.ref.select(version=2)):
        with pytest.warns(UserWarning, match="damaged"), pytest.raises(Damaged, match="v2 of this run is damaged"):
            ct.restore(ref, model=torch.nn.Linear(3, 3), settings=loaded)
    with pytest.warns(UserWarning, match="damaged"):
        assert ct.restore(run.ref.select(version=1), model=torch.nn.Linear(3, 3), settings=loaded).step == 1
