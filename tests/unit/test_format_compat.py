"""Old checkpoints keep loading: the committed format v1 sample in tests/data/format_v1/.

The sample was written once by ``tests/data/make_format_v1_sample.py`` and is
never regenerated here; if one of these tests fails, the current code broke
compatibility with checkpoints users already have on disk.  Fix the code (or
add a migration), not the sample.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckpt_track.format import FORMAT_VERSION, hash_file, load_checkpoint, read_manifest, verify
from ckpt_track.state import apply

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE_DIR = DATA / "format_v1"
SAMPLE = SAMPLE_DIR / "sample"
EXPECTED: dict[str, Any] = json.loads((SAMPLE_DIR / "expected.json").read_text())


def fresh_objects() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Same architecture as the sample, different initial values (seeded differently)."""
    torch.manual_seed(12345)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def check_tensor(name: str, t: torch.Tensor) -> None:
    exp = EXPECTED["tensors"][name]
    assert str(t.dtype).removeprefix("torch.") == exp["dtype"], name
    assert list(t.shape) == exp["shape"], name
    assert float(t.double().sum()) == pytest.approx(exp["sum"], rel=1e-6, abs=1e-7), name


@pytest.fixture(scope="module")
def sample_bytes() -> dict[str, bytes]:
    """Every file of the sample, to prove the tests leave it exactly as committed."""
    return {p.name: p.read_bytes() for p in sorted(SAMPLE.iterdir())}


def test_sample_is_a_committed_v1_checkpoint() -> None:
    manifest = read_manifest(SAMPLE)  # a committed checkpoint: its manifest is valid
    assert manifest.format_version == FORMAT_VERSION == EXPECTED["format_version"] == 1
    assert manifest.step == EXPECTED["step"] == 7
    assert manifest.epoch == EXPECTED["epoch"] == 1
    assert dict(manifest.metrics) == EXPECTED["metrics"] == {"val/loss": 0.5}
    assert sorted(manifest.files) == ["state.json", "tensors-00001-of-00001.safetensors"]
    assert sorted(p.name for p in SAMPLE.iterdir()) == sorted([*manifest.files, "manifest.json"])
    for fname, entry in manifest.files.items():
        assert hash_file(SAMPLE / fname) == entry.hash
    assert verify(SAMPLE) == manifest


def test_sample_is_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLE.iterdir()) + (SAMPLE_DIR / "expected.json").stat().st_size
    assert total < 16 * 1024


def test_sample_tensors_match_expected() -> None:
    manifest, tensors, state = load_checkpoint(SAMPLE)  # verifies every hash first
    assert sorted(tensors) == sorted(EXPECTED["tensors"])
    for name, t in tensors.items():
        check_tensor(name, t)
    assert state["step"] == 7 and state["epoch"] == 1


def test_sample_applies_into_fresh_objects(sample_bytes: dict[str, bytes]) -> None:
    _, tensors, state = load_checkpoint(SAMPLE)
    model, opt, sched = fresh_objects()
    restored = apply(state, tensors, model=model, optimizer=opt, scheduler=sched, rng=True)

    assert restored.step == EXPECTED["step"] and restored.epoch == EXPECTED["epoch"]
    assert restored.extra["note"] == EXPECTED["extra"]["note"] == "format v1 sample"
    assert restored.extra["tokens_seen"] == EXPECTED["extra"]["tokens_seen"] == 1234
    ids = restored.extra["ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == EXPECTED["extra"]["ids"]
    check_tensor("extra/ids", ids)

    for key, value in model.state_dict().items():
        check_tensor(f"model/{key}", value)
        assert torch.equal(value, tensors[f"model/{key}"]), key
    assert int(model[1].num_batches_tracked) == 2

    saved_opt = opt.state_dict()
    assert sorted(saved_opt["state"]) == [0, 1, 2, 3]
    for idx, slots in saved_opt["state"].items():
        for slot, value in slots.items():
            check_tensor(f"optimizer/state/{idx}/{slot}", value)
    (group,) = opt.param_groups
    assert group["betas"] == (0.9, 0.999) and type(group["betas"]) is tuple
    assert math.isclose(group["lr"], EXPECTED["last_lr"][0], rel_tol=0, abs_tol=0)
    assert sched.get_last_lr() == EXPECTED["last_lr"]
    assert sched.last_epoch == EXPECTED["optimizer_steps"]

    # training goes on from the restored state
    model.train()
    opt.zero_grad()
    F.mse_loss(model(torch.ones(8, 4)), torch.zeros(8, 3)).backward()
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [EXPECTED["last_lr"][0] * 0.5]
    assert float(opt.state_dict()["state"][0]["step"]) == EXPECTED["optimizer_steps"] + 1

    # loading and applying never touched the committed files
    assert {p.name: p.read_bytes() for p in sorted(SAMPLE.iterdir())} == sample_bytes


# -- the generator: deliberate use only --------------------------------------------------
def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_format_v1_sample", DATA / "make_format_v1_sample.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_refuses_to_overwrite_the_committed_sample(sample_bytes: dict[str, bytes]) -> None:
    gen = _generator()
    assert gen.DEFAULT_OUT == SAMPLE_DIR
    assert gen.main([]) == 1  # default target is the committed sample: refused
    with pytest.raises(FileExistsError, match="--force"):
        gen.generate(SAMPLE_DIR)
    assert {p.name: p.read_bytes() for p in sorted(SAMPLE.iterdir())} == sample_bytes


def test_generator_force_and_output_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = _generator()
    out = tmp_path / "v1"
    assert gen.main(["--out", str(out)]) == 0
    assert gen.main(["--out", str(out)]) == 1
    assert "already exist" in capsys.readouterr().err
    assert gen.main(["--out", str(out), "--force"]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    fresh = json.loads((out / "expected.json").read_text())
    # same layout as the committed sample (values may differ with the torch version)
    assert sorted(fresh["tensors"]) == sorted(EXPECTED["tensors"])
    assert {k: (v["dtype"], v["shape"]) for k, v in fresh["tensors"].items()} == \
        {k: (v["dtype"], v["shape"]) for k, v in EXPECTED["tensors"].items()}
    verify(out / "sample")
