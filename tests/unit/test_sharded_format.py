"""The sharded format (v2) in one process: ckpt_track's DCP writer and reader without a
process group (``no_dist``), the JSON layout, and what a v1 reader does with a v2 directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import mlp, overwrite
from torch.distributed.checkpoint import save as dcp_save

from ckpt_track.distributed.capture import capture_sharded
from ckpt_track.distributed.layout import parse_layout
from ckpt_track.distributed.restore import restore_dir
from ckpt_track.distributed.run import _committer
from ckpt_track.distributed.storage import ShardWriter
from ckpt_track.errors import CheckpointNotFound, DistributedError, IntegrityError, StateMismatch
from ckpt_track.format import (
    LAYOUT,
    SHARDED_FORMAT_VERSION,
    LocalCheckpoint,
    Manifest,
    load_checkpoint,
    now_iso,
    read_manifest,
    staging,
    verify,
)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = mlp([6, 32, 3], seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return model, opt


def write_sharded(parent: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int = 7,
                  reuse: list[LocalCheckpoint] | None = None) -> LocalCheckpoint:
    """A format-v2 checkpoint written through DCP by one process (what every rank does)."""
    state = capture_sharded(rank=0, step=step, model=model, optimizer=opt, extra={"note": "x"})
    out: list[LocalCheckpoint] = []
    with staging(parent, f"v{step}") as (tmp, final):
        manifest = Manifest(step=step, files={}, created=now_iso(), format_version=SHARDED_FORMAT_VERSION,
                            world_size=1)
        writer = ShardWriter(tmp, reuse or [], {"rank": 0, "rng": state.rng},
                             _committer(tmp, final, state, manifest, 1, out), 64 * 1024)
        dcp_save(dict(state.tensors), storage_writer=writer, no_dist=True)
    return out[0]


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = mlp([6, 32, 3], seed=1)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_round_trip_and_verification(tmp_path: Path) -> None:
    model, opt = _trained()
    ckpt = write_sharded(tmp_path, model, opt)
    manifest = verify(ckpt.path)
    assert manifest.sharded and manifest.world_size == 1 and LAYOUT in manifest.files
    model2, opt2 = _fresh()
    got = restore_dir(ckpt.path, model=model2, optimizer=opt2)
    assert got.step == 7 and got.extra == {"note": "x"}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_v1_reader_refuses_a_sharded_checkpoint(tmp_path: Path) -> None:
    """load_checkpoint would take one shard for a whole tensor: it names the format and the way out."""
    ckpt = write_sharded(tmp_path, *_trained())
    with pytest.raises(IntegrityError, match="sharded checkpoint.*ct.restore"):
        load_checkpoint(ckpt.path)


def test_tampered_shard_changes_nothing(tmp_path: Path) -> None:
    ckpt = write_sharded(tmp_path, *_trained())
    blob = next(p for p in ckpt.path.glob("t-*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    overwrite(blob, bytes(data))
    model, opt = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        restore_dir(ckpt.path, model=model, optimizer=opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state


def test_model_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    ckpt = write_sharded(tmp_path, *_trained())
    other = mlp([6, 16, 3], seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateMismatch, match="does not fit"):
        restore_dir(ckpt.path, model=other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("edit", [
    lambda t: t["chunks"][0].update(offsets=[10**6] * len(t["size"])),  # a chunk outside its tensor
    lambda t: t.update(dtype="object"),  # not a torch dtype
    lambda t: t["chunks"].append(dict(t["chunks"][0])),  # covering the tensor twice
    lambda t: t.update(size="big"),
])
def test_hostile_layout_is_refused(tmp_path: Path, edit) -> None:
    ckpt = write_sharded(tmp_path, *_trained())
    raw = json.loads((ckpt.path / LAYOUT).read_text())
    edit(next(iter(raw["tensors"].values())))
    with pytest.raises(IntegrityError):
        parse_layout(raw)


def test_unchanged_shards_are_linked_not_written(tmp_path: Path) -> None:
    model, opt = _trained()
    first = write_sharded(tmp_path, model, opt, step=1)
    second = write_sharded(tmp_path, model, opt, step=2, reuse=[first])
    blobs = [f for f in second.manifest.files if f.startswith("t-")]
    assert blobs and all(f in first.manifest.files for f in blobs)
    assert all((second.path / f).stat().st_ino == (first.path / f).stat().st_ino for f in blobs)


def test_manifest_v2_needs_its_world_size(tmp_path: Path) -> None:
    ckpt = write_sharded(tmp_path, *_trained())
    raw = json.loads((ckpt.path / "manifest.json").read_text())
    del raw["world_size"]
    overwrite(ckpt.path / "manifest.json", json.dumps(raw).encode())
    with pytest.raises(IntegrityError, match="world_size"):
        read_manifest(ckpt.path)


def test_a_rank_that_cannot_see_the_staging_directory_says_so(tmp_path: Path) -> None:
    """Ranks on another node without a shared filesystem cannot write into rank 0's version."""
    writer = ShardWriter(tmp_path / "not-shared", [], None, None, 1024)
    with pytest.raises(DistributedError, match="filesystem all ranks share"):
        writer.set_up_storage_writer(False)


def test_a_sharded_checkpoint_resolves_like_any_other(tmp_path: Path) -> None:
    """``restore_from`` (behind ct.restore) sends a v2 checkpoint to the sharded reader."""
    from ckpt_track.records import RunInfo, Stored
    from ckpt_track.refs import Ref
    from ckpt_track.restoring import restore_from

    ckpt = write_sharded(tmp_path, *_trained())
    ref = Ref.parse("local://p/r@step=7")
    stored = Stored(ref=ref, run=RunInfo("local", "p", "r", "r", Ref.parse("local://p/r")), version=1, step=7)

    class Found:
        def __init__(self) -> None:
            self.stored = stored

        def fetch(self) -> LocalCheckpoint:
            return ckpt

    model, opt = _fresh()
    got = restore_from(Found(), model=model, optimizer=opt)
    assert got.step == 7 and got.ref == str(ref)
    with pytest.raises(CheckpointNotFound):
        read_manifest(tmp_path / "nothing")


def test_the_dtensor_shim_matches_the_installed_torch(tmp_path: Path) -> None:
    """wrap_like builds a DTensor over a host tensor without moving it (one-rank gloo mesh)."""
    import os

    import torch.distributed as dist
    from distributed.launch import free_port
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckpt_track.distributed._compat import default_store, wrap_like

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        like = distribute_tensor(torch.randn(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
        local = torch.arange(12.0).reshape(4, 3)
        wrapped = wrap_like(local, like)
        assert wrapped.placements == like.placements and wrapped.shape == like.shape
        assert wrapped.to_local().data_ptr() == local.data_ptr()  # the very tensor, not a copy
        default_store().set("ckpt_track/probe", "1")
    finally:
        dist.destroy_process_group()
