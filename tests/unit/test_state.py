"""Round trips of training state: capture -> snapshot -> write -> load -> apply.

Every test goes through the real on-disk format (safetensors + JSON), so what is
checked here is what a user gets back after a restart, not an in-memory copy.
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import overwrite
from safetensors import safe_open
from torch import nn

import ckpt_track as ct
from ckpt_track.errors import IntegrityError, SerializationError, StateMismatch
from ckpt_track.format import load_checkpoint, tensor_files, write_checkpoint
from ckpt_track.state import Restored, apply, capture, decode_tree, encode_tree
from ckpt_track.writer import snapshot_tensors

# -- helpers ---------------------------------------------------------------------
_counter = iter(range(1_000_000))


def roundtrip(tmp_path: Path, *, step: int = 1, epoch: int | None = None, **objs: Any
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """capture(**objs) through the on-disk format; returns (state tree, tensors, checkpoint dir)."""
    captured = capture(step=step, epoch=epoch, **objs)
    snap = snapshot_tensors(captured.tensors, copy=True)
    ckpt = write_checkpoint(tmp_path / "ckpts", f"c{next(_counter)}", snap, captured.tree, step=step, epoch=epoch)
    manifest, tensors, state = load_checkpoint(ckpt.path)
    assert manifest.step == step and manifest.epoch == epoch
    return state, tensors, ckpt.path


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of the same width (NaN-safe bitwise comparison)."""
    if t.is_floating_point():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(width)
    return t


def assert_tensor_same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(bits(a.detach().cpu()), bits(b.detach().cpu())), f"{what}: values differ"


def assert_same(a: Any, b: Any, what: str = "") -> None:
    """Deep equality with exact types: tensors bitwise, NaN == NaN, tuples stay tuples."""
    if isinstance(a, torch.Tensor):
        assert_tensor_same(a, b, what)
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{what}: {type(b)} is not a dict"
        assert set(a) == set(b), f"{what}: keys {sorted(map(repr, a))} != {sorted(map(repr, b))}"
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{what}: key {k!r} changed type"
            assert_same(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{what}: {type(a).__name__} became {type(b).__name__}"
        assert len(a) == len(b), f"{what}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{what}: {b!r} is not NaN"
    else:
        assert type(a) is type(b), f"{what}: {type(a).__name__} became {type(b).__name__} ({a!r} vs {b!r})"
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_state_dicts_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_tensor_same(sa[k], sb[k], k)


def stored_tensor_names(ckpt_dir: Path) -> list[str]:
    """Tensor names actually present in the safetensors files of a checkpoint."""
    from ckpt_track.format import read_manifest

    names: list[str] = []
    for fname in tensor_files(read_manifest(ckpt_dir)):
        with safe_open(str(ckpt_dir / fname), framework="pt") as f:
            names.extend(f.keys())
    return names


def batches(seed: int, n: int, shape_in: int = 4, shape_out: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(8, shape_in, generator=g), torch.randn(8, shape_out, generator=g)


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    opt.step()


# -- model -----------------------------------------------------------------------
def test_model_with_buffers_round_trips(tmp_path: Path) -> None:
    model = make_mlp(0)
    model.train()
    for x, _ in batches(1, 3):
        model(x)  # updates BatchNorm running stats and num_batches_tracked
    assert int(model[1].num_batches_tracked) == 3

    state, tensors, _ = roundtrip(tmp_path, model=model, rng=False)
    fresh = make_mlp(99)
    restored = apply(state, tensors, model=fresh, rng=False)

    assert isinstance(restored, Restored)
    assert_state_dicts_same(model, fresh)
    assert fresh[1].num_batches_tracked.dtype == torch.int64
    assert int(fresh[1].num_batches_tracked) == 3
    model.eval(), fresh.eval()
    x = torch.randn(5, 4)
    assert torch.equal(model(x), fresh(x))


def test_model_keys_are_flat_and_readable(tmp_path: Path) -> None:
    _, tensors, ckpt = roundtrip(tmp_path, model=make_mlp(0), rng=False)
    expected = {f"model/{k}" for k in make_mlp(0).state_dict()}
    assert set(tensors) == expected
    assert set(stored_tensor_names(ckpt)) == expected


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10)
        self.out.weight = self.emb.weight  # weight tying

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    with torch.no_grad():
        model.emb.weight.mul_(3)
    assert set(model.state_dict()) == {"emb.weight", "out.weight", "out.bias"}

    state, tensors, ckpt = roundtrip(tmp_path, model=model, rng=False)
    names = stored_tensor_names(ckpt)
    assert len(names) == 2, names  # the shared weight once + the bias
    assert len(tensors) == 2

    torch.manual_seed(1)
    fresh = TiedLM()
    apply(state, tensors, model=fresh, rng=False)
    assert fresh.out.weight is fresh.emb.weight
    assert_state_dicts_same(model, fresh)
    with torch.no_grad():
        fresh.emb.weight[0, 0] = 123.0
    assert fresh.out.weight[0, 0].item() == 123.0
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        fresh.emb.weight[0, 0] = model.emb.weight[0, 0]
        assert torch.equal(model(ids), fresh(ids))


def test_tied_weights_restore_into_untied_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    state, tensors, _ = roundtrip(tmp_path, model=model, rng=False)
    torch.manual_seed(1)
    untied = TiedLM()
    untied.out.weight = nn.Parameter(torch.zeros(10, 4))
    apply(state, tensors, model=untied, rng=False)
    assert torch.equal(untied.out.weight, model.emb.weight)
    assert torch.equal(untied.emb.weight, model.emb.weight)


class Strided(nn.Module):
    def __init__(self, fill: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("transposed", fill(3, 5).t())  # non-contiguous
        self.register_buffer("every_third", fill(20)[::3])  # strided
        self.register_buffer("offset", fill(10)[4:7])  # storage offset, shares a bigger storage


def test_non_contiguous_tensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Strided(torch.randn)
    assert not model.transposed.is_contiguous() and not model.every_third.is_contiguous()
    assert model.offset.storage_offset() == 4
    big = torch.randn(6, 7)
    extra = {
        "column": big[:, 2],  # non-contiguous view
        "row": big[1],  # contiguous view with an offset, same storage as "column"
        "whole": big,
        "weight_t": model.lin.weight.t(),  # transposed view of a parameter
        "weight": model.lin.weight,  # the parameter itself: deduplicated with model/lin.weight
    }
    state, tensors, ckpt = roundtrip(tmp_path, model=model, extra=extra, rng=False)
    assert "extra/weight" not in stored_tensor_names(ckpt)

    fresh = Strided(torch.zeros)
    restored = apply(state, tensors, model=fresh, rng=False)
    assert_state_dicts_same(model, fresh)
    assert not fresh.transposed.is_contiguous()  # the live buffer keeps its layout
    for key, value in extra.items():
        assert_tensor_same(value, restored.extra[key], key)
    assert torch.equal(restored.extra["weight"], fresh.lin.weight)


def test_snapshot_decouples_checkpoint_from_live_tensors(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    captured = capture(step=0, model=model, rng=False)
    snap = snapshot_tensors(captured.tensors, copy=True)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the snapshot is written
    ckpt = write_checkpoint(tmp_path, "c", snap, captured.tree, step=0)
    _, tensors, _ = load_checkpoint(ckpt.path)
    assert torch.equal(tensors["model/weight"], before)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


def _values(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if dtype == torch.bool:
        return torch.rand(2, 9, generator=g) > 0.5
    if dtype.is_floating_point:
        t = (torch.randn(2, 9, generator=g) * 100).to(dtype)
        t[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]).to(dtype)
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), (2, 9), generator=g, dtype=torch.int64).to(dtype)
    t[0, 0], t[0, 1] = info.min, info.max
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    class Holder(nn.Module):
        def __init__(self, t: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("buf", t)

    values = _values(dtype)
    model = Holder(values.clone())
    extra = {"t": values, "scalar": values[1, 5].clone(), "empty": values[:0]}
    state, tensors, _ = roundtrip(tmp_path, model=model, extra=extra, rng=False)
    fresh = Holder(torch.zeros_like(values))
    restored = apply(state, tensors, model=fresh, rng=False)
    assert_tensor_same(values, fresh.buf, "buf")
    for key, value in extra.items():
        assert_tensor_same(value, restored.extra[key], key)


def test_mixed_dtype_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 2).to(torch.float16))
    state, tensors, _ = roundtrip(tmp_path, model=model, rng=False)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 2).to(torch.float16))
    apply(state, tensors, model=fresh, rng=False)
    assert_state_dicts_same(model, fresh)


# -- optimizers ------------------------------------------------------------------
def _two_groups(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": model[0].parameters(), "lr": 0.02},
            {"params": list(model[1].parameters()) + list(model[3].parameters()), "weight_decay": 0.01}]


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "sgd-nesterov-wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adam-amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True, betas=(0.8, 0.95)),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adamw-groups": lambda m: torch.optim.AdamW(_two_groups(m), lr=1e-2),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2),
    "rmsprop-centered-momentum": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2, momentum=0.9, centered=True),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_resume_is_bit_identical(tmp_path: Path, name: str) -> None:
    make_opt = OPTIMIZERS[name]
    model = make_mlp(0)
    opt = make_opt(model)
    data = list(batches(7, 8))
    for x, y in data[:3]:
        train_step(model, opt, x, y)

    state, tensors, _ = roundtrip(tmp_path, step=3, model=model, optimizer=opt, rng=False)
    fresh = make_mlp(123)
    fresh_opt = make_opt(fresh)
    restored = apply(state, tensors, model=fresh, optimizer=fresh_opt, rng=False)
    assert restored.step == 3
    assert_state_dicts_same(model, fresh)
    assert_same(opt.state_dict(), fresh_opt.state_dict(), "optimizer")

    for x, y in data[3:]:
        train_step(model, opt, x, y)
        train_step(fresh, fresh_opt, x, y)
    assert_state_dicts_same(model, fresh)
    assert_same(opt.state_dict(), fresh_opt.state_dict(), "optimizer after more steps")


def test_optimizer_state_keeps_int_keys_and_tuple_hyperparameters(tmp_path: Path) -> None:
    model = make_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.85, 0.99))
    x, y = next(batches(0, 1))
    train_step(model, opt, x, y)
    state, tensors, _ = roundtrip(tmp_path, optimizer=opt, rng=False)
    saved = decode_tree(state["optimizer"], tensors)
    assert all(type(k) is int for k in saved["state"])
    assert saved["param_groups"][0]["betas"] == (0.85, 0.99)
    assert type(saved["param_groups"][0]["betas"]) is tuple
    assert set(tensors) >= {"optimizer/state/0/exp_avg", "optimizer/state/0/exp_avg_sq", "optimizer/state/0/step"}


# -- schedulers ------------------------------------------------------------------
S = torch.optim.lr_scheduler


def _halve(epoch: int) -> float:
    return 0.5 ** (epoch // 2)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=12),
    "lambda": lambda o: S.LambdaLR(o, lambda e: 0.9**e),
    "lambda-fn": lambda o: S.LambdaLR(o, _halve),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.9),
    "sequential": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=5)], milestones=[3]),
    "chained": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.9), S.StepLR(o, step_size=3, gamma=0.5)]),
    "plateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def _sched_step(sched: Any, i: int) -> None:
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(1.0 if i < 2 else 2.0 + i)  # stops improving after 2 epochs
    else:
        sched.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_resume_is_identical(tmp_path: Path, name: str) -> None:
    make_sched = SCHEDULERS[name]
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = make_sched(opt)
    data = list(batches(5, 9))
    for i, (x, y) in enumerate(data[:4]):
        train_step(model, opt, x, y)
        _sched_step(sched, i)

    state, tensors, _ = roundtrip(tmp_path, step=4, model=model, optimizer=opt, scheduler=sched, rng=False)
    fresh = make_mlp(1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_sched = make_sched(fresh_opt)
    apply(state, tensors, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, rng=False)
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert fresh_sched.get_last_lr() == sched.get_last_lr()

    for i, (x, y) in enumerate(data[4:], start=4):
        for m, o, s in ((model, opt, sched), (fresh, fresh_opt, fresh_sched)):
            train_step(m, o, x, y)
            _sched_step(s, i)
        assert fresh_sched.get_last_lr() == sched.get_last_lr()
        assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert_state_dicts_same(model, fresh)


def test_plateau_scheduler_infinity_survives_json(tmp_path: Path) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    sched = S.ReduceLROnPlateau(opt, mode="max")  # best starts at -inf
    state, tensors, _ = roundtrip(tmp_path, scheduler=sched, rng=False)
    fresh = S.ReduceLROnPlateau(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), mode="max")
    fresh.best = 0.0
    apply(state, tensors, scheduler=fresh, rng=False)
    assert fresh.best == float("-inf")


# -- GradScaler --------------------------------------------------------------------
def _scaled_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 x: torch.Tensor, y: torch.Tensor, *, poison: bool = False) -> None:
    opt.zero_grad(set_to_none=True)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[0] = float("inf")  # forces a skipped step and a backoff
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_round_trips(tmp_path: Path) -> None:
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=3.0, growth_interval=2)
    data = list(batches(2, 9))
    for i, (x, y) in enumerate(data[:5]):
        _scaled_step(model, opt, scaler, x, y, poison=(i == 1))
    assert scaler.state_dict()["_growth_tracker"] == 1
    assert scaler.get_scale() == 1536.0  # 1024 -> backoff 512 -> growth 1536

    state, tensors, _ = roundtrip(tmp_path, model=model, optimizer=opt, scaler=scaler, rng=False)
    fresh = make_mlp(1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01)
    fresh_scaler = torch.amp.GradScaler("cpu")
    apply(state, tensors, model=fresh, optimizer=fresh_opt, scaler=fresh_scaler, rng=False)
    assert fresh_scaler.state_dict() == scaler.state_dict()

    for i, (x, y) in enumerate(data[5:]):
        _scaled_step(model, opt, scaler, x, y, poison=(i == 2))
        _scaled_step(fresh, fresh_opt, fresh_scaler, x, y, poison=(i == 2))
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert_state_dicts_same(model, fresh)


# -- RNG ----------------------------------------------------------------------------
def _draw() -> tuple[Any, ...]:
    return (
        [random.random() for _ in range(3)], random.gauss(0, 1),
        np.random.rand(4).tolist(), np.random.standard_normal(3).tolist(), np.random.randn(),
        torch.rand(4), torch.randn(3),
    )


def test_rng_state_round_trips(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # ... and in numpy's (has_gauss=1)
    state, tensors, _ = roundtrip(tmp_path, rng=True)
    first = _draw()
    assert _draw() != first  # (sanity: drawing moves the generators on)

    apply(state, tensors, rng=True)
    second = _draw()
    assert_same(first, second, "draws")


def test_rng_false_leaves_generators_alone(tmp_path: Path) -> None:
    state, tensors, _ = roundtrip(tmp_path, rng=True)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = _draw()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    apply(state, tensors, rng=False)
    assert_same(expected, _draw())


def test_checkpoint_without_rng_leaves_generators_alone(tmp_path: Path) -> None:
    state, tensors, _ = roundtrip(tmp_path, rng=False)
    assert "rng" not in state
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = _draw()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    apply(state, tensors, rng=True)
    assert_same(expected, _draw())


def test_public_rng_capture_and_apply_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    """What integrations keep in their own state (the RNG at an epoch's start) is the record
    a checkpoint stores, and sets the generators back exactly, also after the JSON codec."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()
    saved = ct.capture_rng()
    first = _draw()
    state, tensors, _ = roundtrip(tmp_path, extra={"rng_at_start": saved}, rng=False)
    assert set(saved) >= {"python", "torch", "numpy"}
    ct.apply_rng(saved)
    assert_same(first, _draw(), "draws after apply_rng")
    ct.apply_rng(apply(state, tensors, rng=False).extra["rng_at_start"])
    assert_same(first, _draw(), "draws after apply_rng of the stored record")
    # the same record log_checkpoint stores under "rng"
    captured = capture(step=0)
    assert_same(decode_tree(captured.tree["rng"], captured.tensors), ct.capture_rng())


def test_apply_rng_refuses_a_malformed_record_and_changes_nothing() -> None:
    good = ct.capture_rng()
    bad = {**good, "numpy": ["MT19937", [0] * 3, 0, 0, 0.0]}  # python and torch fine, numpy broken
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    expected = _draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    with pytest.raises(IntegrityError, match="numpy"):
        ct.apply_rng(bad)
    assert_same(expected, _draw())  # python's and torch's generators were not set either
    with pytest.raises(IntegrityError):
        ct.apply_rng("not a record")  # type: ignore[arg-type]


def test_is_storable_matches_what_capture_accepts() -> None:
    assert ct.is_storable({"betas": (0.9, 0.99), 1: torch.ones(2), "x": np.float32(1.5), "n": None})
    for bad in (object(), {1, 2}, torch.eye(2).to_sparse(), np.array(["a"]), Path(".")):
        assert not ct.is_storable(bad)
        with pytest.raises(SerializationError):
            capture(step=0, extra={"v": bad}, rng=False)


def test_save_checkpoint_and_read_it_back_without_live_objects(tmp_path: Path) -> None:
    """The integration API: a directory written outside any run, verified and decoded."""
    model = make_mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in batches(0, 2):
        train_step(model, opt, x, y)
    target = tmp_path / "ckpts" / "last.ckpt"
    target.parent.mkdir()
    for step in (1, 2):  # the second replaces the first whole
        assert ct.save_checkpoint(target, step=step, epoch=0, model=model, optimizer=opt,
                                  extra={"k": {1: (2, 3)}}) == target
    assert ct.is_checkpoint_dir(target) and not ct.is_checkpoint_dir(tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    found = ct.fetch_checkpoint(target)
    assert (found.step, found.epoch, found.ref, found.stored) == (2, 0, None, None)
    assert found.state_hash == load_checkpoint(target)[0].files["state.json"].hash
    state = found.read()
    assert state.step == 2 and state.extra == {"k": {1: (2, 3)}} and state.scheduler is None
    for k, v in model.state_dict().items():
        assert_tensor_same(v, state.model[k], k)
    assert_same(opt.state_dict(), state.optimizer, "optimizer")
    assert set(state.rng) >= {"python", "torch"}


def test_read_names_the_keys_of_tied_tensors(tmp_path: Path) -> None:
    """A reader that writes each tensor once (save_pretrained's layout) keeps the key the tied
    tensor was stored under, whatever order the keys come back in."""
    model = TiedLM()
    state = ct.fetch_checkpoint(ct.save_checkpoint(tmp_path / "c", step=1, model=model, rng=False)).read()
    assert state.model_aliases == {"out.weight": "emb.weight"}
    assert state.model is not None and state.model["out.weight"] is state.model["emb.weight"]


def test_read_refuses_a_damaged_checkpoint(tmp_path: Path) -> None:
    target = ct.save_checkpoint(tmp_path / "c", step=1, model=make_mlp(0))
    shard = next(p for p in target.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    overwrite(shard, bytes(raw))
    with pytest.raises(IntegrityError):
        ct.fetch_checkpoint(target).read()


def test_find_checkpoint_is_none_for_a_run_without_checkpoints(tmp_path: Path) -> None:
    assert ct.find_checkpoint(f"local://p/nothing-yet?root={tmp_path}") is None
    run = ct.init(project="p", name="r", settings={"local": {"root": str(tmp_path)}})
    run.log_checkpoint(5, model=make_mlp(0), blocking=True)
    run.finish()
    found = ct.find_checkpoint(f"local://p/r?root={tmp_path}")
    assert found is not None and found.step == 5
    with pytest.raises(ct.CheckpointNotFound, match="no checkpoint matches"):
        ct.find_checkpoint(f"local://p/r@step=6?root={tmp_path}")


# -- step, epoch, extra ------------------------------------------------------------------
@pytest.mark.parametrize("step, epoch", [(0, None), (42, 3), (2**40, 0)])
def test_step_and_epoch(tmp_path: Path, step: int, epoch: int | None) -> None:
    state, tensors, _ = roundtrip(tmp_path, step=step, epoch=epoch, rng=False)
    restored = apply(state, tensors, rng=False)
    assert restored.step == step and type(restored.step) is int
    assert restored.epoch == epoch


def test_extra_round_trips_exact_python_types(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    extra = {
        "nested": {"a": [1, 2.5, None, True, False, "s", ""], "b": {"c": [], "d": {}}, "unicode": "héllo ✓"},
        "tup": (1, (2, 3), "x", ()),
        "list_of_tuples": [(1, 2), (3,)],
        "int_keys": {1: "a", 2: [3], -7: {"x": 1}},
        "tuple_keys": {(1, 2): "pair"},
        "mixed_keys": {"s": 1, 2: "two"},
        "looks_like_a_tag": {"__ct__": "tensor", "name": "model/weight"},
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "neg_zero": -0.0,
        "floats": [0.1, 1e-300, 1.7976931348623157e308, 5e-324],
        "big_int": 2**70,
        "tensor": t,
        "named": {"bf16": torch.ones(3, dtype=torch.bfloat16), "in_list": [torch.zeros(2), {"deep": torch.eye(2)}]},
        "tensor_by_int_key": {0: torch.full((2,), 7.0)},
        "same_tensor_twice": [t, t],
    }
    state, tensors, _ = roundtrip(tmp_path, extra=extra, rng=False)
    restored = apply(state, tensors, rng=False)
    assert_same(extra, dict(restored.extra), "extra")
    assert math.copysign(1.0, restored.extra["neg_zero"]) == -1.0
    assert restored.extra["same_tensor_twice"][0] is restored.extra["same_tensor_twice"][1]
    assert {"extra/tensor", "extra/named/bf16", "extra/named/in_list/0", "extra/named/in_list/1/deep"} <= set(tensors)


def test_numpy_values_in_extra(tmp_path: Path) -> None:
    extra = {"f": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True), "arr": np.arange(6, dtype=np.int32)[::2]}
    state, tensors, _ = roundtrip(tmp_path, extra=extra, rng=False)
    restored = apply(state, tensors, rng=False)
    assert restored.extra["f"] == 1.5 and restored.extra["i"] == 7 and restored.extra["b"] is True
    assert torch.equal(restored.extra["arr"], torch.tensor([0, 2, 4], dtype=torch.int32))


def test_encode_decode_tree_is_json_and_inverse() -> None:
    import json

    value = {"a": (1, [2, {3: torch.ones(2)}]), "b": {"__ct__": 1}}
    tree, tensors = encode_tree(value, "x")
    json.dumps(tree, allow_nan=True)  # plain JSON, tensors replaced by placeholders
    assert list(tensors) == ["x/a/1/1/3"]
    assert_same(value, decode_tree(json.loads(json.dumps(tree)), tensors))


# -- errors ------------------------------------------------------------------------------
def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved_small(tmp_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state, tensors, _ = roundtrip(tmp_path, model=model, rng=False)
    return state, tensors


def test_missing_key_raises_and_leaves_model_unchanged(tmp_path: Path) -> None:
    state, tensors = _saved_small(tmp_path)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    before = _params(target)
    with pytest.raises(StateMismatch, match="missing") as info:
        apply(state, tensors, model=target, rng=False)
    assert "2.weight" in str(info.value) and "2.bias" in str(info.value)
    assert "0.weight" not in str(info.value)
    assert_same(before, _params(target))


def test_unexpected_key_raises_and_leaves_model_unchanged(tmp_path: Path) -> None:
    state, tensors = _saved_small(tmp_path)
    target = nn.Sequential(nn.Linear(3, 4))
    before = _params(target)
    with pytest.raises(StateMismatch, match="not in the model") as info:
        apply(state, tensors, model=target, rng=False)
    assert "1.weight" in str(info.value) and "1.bias" in str(info.value)
    assert_same(before, _params(target))


def test_wrong_shape_raises_and_leaves_model_unchanged(tmp_path: Path) -> None:
    state, tensors = _saved_small(tmp_path)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    before = _params(target)
    for strict in (True, False):
        with pytest.raises(StateMismatch, match="shape") as info:
            apply(state, tensors, model=target, rng=False, strict=strict)
        msg = str(info.value)
        assert "1.weight" in msg and "(2, 4)" in msg and "(5, 4)" in msg
        assert "0.weight" not in msg
        assert_same(before, _params(target))


def test_many_mismatched_keys_are_abbreviated(tmp_path: Path) -> None:
    state, tensors = _saved_small(tmp_path)
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])
    with pytest.raises(StateMismatch, match=r"more\)"):
        apply(state, tensors, model=target, rng=False)


def test_strict_false_ignores_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state, tensors, _ = roundtrip(tmp_path, model=saved_model, rng=False)

    bigger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    third_before = _params(bigger[2])
    apply(state, tensors, model=bigger, rng=False, strict=False)
    assert_same(_params(saved_model[0]), _params(bigger[0]))
    assert_same(_params(saved_model[1]), _params(bigger[1]))
    assert_same(third_before, _params(bigger[2]))

    smaller = nn.Sequential(nn.Linear(3, 4))
    apply(state, tensors, model=smaller, rng=False, strict=False)
    assert_same(_params(saved_model[0]), _params(smaller[0]))


def test_optimizer_with_different_param_count_raises(tmp_path: Path) -> None:
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, *next(batches(0, 1)))
    state, tensors, _ = roundtrip(tmp_path, optimizer=opt, rng=False)

    fewer = torch.optim.SGD(list(make_mlp(1).parameters())[:-1], lr=0.1, momentum=0.9)
    with pytest.raises(StateMismatch, match="optimizer"):
        apply(state, tensors, optimizer=fewer, rng=False)
    more_groups = torch.optim.SGD([{"params": make_mlp(1).parameters()}, {"params": [nn.Parameter(torch.ones(1))]}],
                                  lr=0.1, momentum=0.9)
    with pytest.raises(StateMismatch, match="optimizer"):
        apply(state, tensors, optimizer=more_groups, rng=False)


def test_optimizer_mismatch_leaves_model_unchanged(tmp_path: Path) -> None:
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, *next(batches(0, 1)))
    state, tensors, _ = roundtrip(tmp_path, model=model, optimizer=opt, rng=False)
    target = make_mlp(1)
    wrong_opt = torch.optim.SGD(list(target.parameters()) + [nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9)
    before = _params(target)
    with pytest.raises(StateMismatch):
        apply(state, tensors, model=target, optimizer=wrong_opt, rng=False)
    assert_same(before, _params(target))


@pytest.mark.parametrize("what", ["model", "optimizer", "scheduler", "scaler"])
def test_missing_section_raises(tmp_path: Path, what: str) -> None:
    state, tensors, _ = roundtrip(tmp_path, rng=False)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    objs = {"model": model, "optimizer": opt, "scheduler": S.StepLR(opt, 1), "scaler": torch.amp.GradScaler("cpu")}
    with pytest.raises(StateMismatch, match=f"no {what} state"):
        apply(state, tensors, rng=False, **{what: objs[what]})


def test_state_referring_to_absent_tensor_raises(tmp_path: Path) -> None:
    state, tensors, _ = roundtrip(tmp_path, model=nn.Linear(2, 1), rng=False)
    del tensors["model/weight"]
    with pytest.raises(StateMismatch, match="model/weight"):
        apply(state, tensors, model=nn.Linear(2, 1), rng=False)


def test_unknown_tag_raises() -> None:
    with pytest.raises(StateMismatch, match="unknown tag"):
        decode_tree({"__ct__": "from-the-future", "items": []}, {})


@pytest.mark.parametrize("bad, type_name", [(object(), "object"), (lambda: 1, "function"), ({1, 2}, "set"),
                                            (b"bytes", "bytes"), (Path("x"), "Path"), (1 + 2j, "complex")])
def test_unserializable_extra_raises_at_capture_naming_the_path(bad: Any, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        capture(step=0, extra={"ok": 1, "foo": bad}, rng=False)
    assert "extra/foo" in str(info.value)
    assert type_name in str(info.value)
    assert isinstance(info.value, TypeError)


def test_unserializable_value_deep_inside_extra_names_full_path() -> None:
    with pytest.raises(SerializationError, match="extra/a/b/1"):
        capture(step=0, extra={"a": {"b": [1, object()]}}, rng=False)
    with pytest.raises(SerializationError, match="extra/t/2"):
        capture(step=0, extra={"t": (1, 2, {3})}, rng=False)


def test_extra_must_have_str_keys() -> None:
    with pytest.raises(SerializationError, match="extra"):
        capture(step=0, extra={1: "x"}, rng=False)
    with pytest.raises(SerializationError, match="extra"):
        capture(step=0, extra=[("a", 1)], rng=False)  # type: ignore[arg-type]


def test_colliding_tensor_names_are_refused() -> None:
    with pytest.raises(SerializationError, match="extra/a/b"):
        capture(step=0, extra={"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}}, rng=False)


def test_numpy_string_array_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match="extra/foo"):
        capture(step=0, extra={"foo": np.array(["a", "b"])}, rng=False)


def test_sparse_tensor_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match="extra/foo"):
        capture(step=0, extra={"foo": torch.eye(3).to_sparse()}, rng=False)


# -- no pickle on load ---------------------------------------------------------------------
def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = S.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in batches(0, 2):
        train_step(model, opt, x, y)
        sched.step()
    captured = capture(step=2, epoch=0, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                       extra={"t": torch.ones(2), "k": {1: (2, 3)}}, rng=True)
    ckpt = write_checkpoint(tmp_path, "c", snapshot_tensors(captured.tensors, copy=True), captured.tree, step=2)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling attempted while loading a checkpoint")

    import _pickle

    for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (pickle, "_loads"),
                      (pickle, "_load"), (pickle, "_Unpickler"), (_pickle, "loads"), (_pickle, "load"),
                      (_pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load"), (np, "load")]:
        monkeypatch.setattr(mod, attr, boom)

    _, tensors, state = load_checkpoint(ckpt.path)
    fresh = make_mlp(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = S.OneCycleLR(fresh_opt, max_lr=0.1, total_steps=10)
    restored = apply(state, tensors, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched,
                     scaler=torch.amp.GradScaler("cpu"), rng=True)
    assert restored.step == 2 and restored.extra["k"] == {1: (2, 3)}
    assert_state_dicts_same(model, fresh)
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
