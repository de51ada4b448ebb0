"""Multi-rank checkpoints with real gloo process groups on CPU (2-4 ranks, separate processes
started like torchrun): DDP, FSDP2 and tensor parallel save one version per step, resume
bit-identically after every rank is killed, reshard to other world sizes, never unpickle,
survive a rank killed mid-write or before the commit, and fail with a typed error when a rank
hangs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed.launch import run, start

ENV = {"CKPT_TRACK_COLLECTIVE_TIMEOUT": "30"}


def _train(world: int, cwd: Path, ok: bool = True, env: dict[str, str] | None = None,
           rank_env: dict[int, dict[str, str]] | None = None, **args: object) -> list:
    out = cwd / "out"
    out.mkdir(parents=True, exist_ok=True)
    return run(world, {"do": "train", "out": str(out), **args}, cwd, env={**ENV, **(env or {})}, ok=ok,
               rank_env=rank_env)


def _state(cwd: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(cwd / "out" / f"rank{rank}.safetensors")


def _versions(cwd: Path) -> list[dict]:
    """The manifests of every committed version of the test's run, oldest first."""
    return [json.loads(m.read_text()) for m in sorted(cwd.glob("ckpt_runs/dist/*/checkpoints/v*/manifest.json"))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The uninterrupted 2-rank run of a kind to 8 steps (checkpoint every 2), trained once per
    module: the state every interrupted run must end in."""
    done: dict[str, Path] = {}

    def get(kind: str) -> dict[int, dict[str, torch.Tensor]]:
        if kind not in done:
            done[kind] = tmp_path_factory.mktemp(f"straight-{kind}")
            _train(2, done[kind], kind=kind, steps=8, every=2)
        return {rank: _state(done[kind], rank) for rank in range(2)}

    return get


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:6]}"


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "tp"])
def test_kill_every_rank_and_resume_bit_identical_without_pickle(tmp_path: Path, kind: str, straight) -> None:
    """Dropout draws from each rank's own RNG: the resumed run matches only if every rank got
    its own RNG (and optimizer shards) back.  One version per checkpointed step.  pickle.load,
    pickle.loads and torch.load raise in every rank of the interrupted and the resumed job."""
    codes = _train(2, tmp_path, ok=False, kind=kind, steps=8, every=2, die_after=3, no_pickle=True)
    assert [c for c, _ in codes] == [-9, -9]
    _train(2, tmp_path, kind=kind, steps=8, every=2, no_pickle=True)
    assert (tmp_path / "out" / "start0.txt").read_text() == (tmp_path / "out" / "start1.txt").read_text() == "4"
    want = straight(kind)
    for rank in range(2):
        _assert_equal(want[rank], _state(tmp_path, rank))
    versions = _versions(tmp_path)
    assert [v["step"] for v in versions] == [1, 3, 5, 7]  # one version per step, whatever the world size
    assert {(v["format_version"], v["world_size"]) for v in versions} == {(2, 2)}


def test_ddp_replicated_tensors_are_written_once(tmp_path: Path) -> None:
    _train(2, tmp_path, kind="ddp", steps=2, every=2, resume=False)
    (v,) = _versions(tmp_path)
    tensor_bytes = sum(f["size"] for n, f in v["files"].items() if n.endswith(".safetensors"))
    layout = json.loads(next(tmp_path.glob("ckpt_runs/dist/*/checkpoints/v*/layout.json")).read_text())
    raw = sum(torch.empty(t["size"], dtype=getattr(torch, t["dtype"])).nbytes
              for n, t in layout["tensors"].items() if not n.startswith("rng/"))
    assert tensor_bytes < raw * 1.2 + 64 * 1024  # once, not once per rank (plus headers and RNG states)


@pytest.mark.parametrize(("writers", "readers"), [(2, [1, 3]), (4, [2])])
def test_reshard_to_other_world_sizes(tmp_path: Path, writers: int, readers: list[int]) -> None:
    """An FSDP2 checkpoint restores bit-exactly into another number of ranks, and (readers 1)
    into a plain single process with ct.restore: model and optimizer."""
    _train(writers, tmp_path, kind="fsdp", steps=4, every=4, resume=False)
    want = _state(tmp_path, 0)
    for world in readers:
        out = tmp_path / f"into{world}"
        out.mkdir()
        run(world, {"do": "restore", "kind": "fsdp", "ref": "local://dist/r@latest", "out": str(out)}, tmp_path,
            env=ENV)
        for rank in range(world):
            assert (out / f"step{rank}.txt").read_text() == "3"
            _assert_equal(want, load_file(out / f"rank{rank}.safetensors"))


def _spool_leftovers(cwd: Path) -> list[Path]:
    return [p for p in cwd.glob("ckpt_runs/.spool/*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("fault", [{"kill_in_write": [1, 2]}, {"kill_before_commit": 2}])
def test_killed_rank_leaves_no_partial_version(tmp_path: Path, fault: dict, straight) -> None:
    """A rank SIGKILLed inside its write of the second checkpoint, or rank 0 after every rank's
    writes were gathered but before the commit: no partial version is ever listed, the next
    start resumes from the previous complete one and removes the staging directory."""
    codes = _train(2, tmp_path, ok=False, kind="fsdp", steps=8, every=2, **fault)
    assert any(c == -9 for c, _ in codes), codes
    assert [v["step"] for v in _versions(tmp_path)] == [1]
    _train(2, tmp_path, kind="fsdp", steps=8, every=2)
    assert (tmp_path / "out" / "start0.txt").read_text() == "2"
    assert [v["step"] for v in _versions(tmp_path)] == [1, 3, 5, 7]
    assert not _spool_leftovers(tmp_path)
    _assert_equal(straight("fsdp")[1], _state(tmp_path, 1))


def test_hung_rank_gives_a_typed_error_after_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ranks = start(2, {"do": "hang", "out": str(out)}, tmp_path, env={"CKPT_TRACK_COLLECTIVE_TIMEOUT": "3"})
    code0 = ranks.procs[0].wait(timeout=90)
    ranks.procs[1].kill()
    ranks.wait()
    assert code0 == 3
    kind, took, message = (out / "error.txt").read_text().split("|", 2)
    assert kind in ("CheckpointWriteError", "DistributedError")
    assert "collective_timeout" in message and float(took) < 60
    assert not _versions(tmp_path)


def test_unchanged_sharded_state_adds_almost_nothing(tmp_path: Path) -> None:
    _train(2, tmp_path, kind="fsdp", steps=2, every=2, repeat=3, resume=False, width=512)
    first, *rest = _versions(tmp_path)
    for prev, v in zip([first, *rest], rest):
        new = sum(f["size"] for n, f in v["files"].items() if n not in prev["files"])
        assert new <= 1024 * 1024
    assert sum(f["size"] for f in first["files"].values()) > 1024 * 1024  # the state itself is larger


def test_frozen_base_sends_about_the_adapter(tmp_path: Path) -> None:
    _train(2, tmp_path, kind="fsdp", steps=3, every=1, resume=False, frozen=True, width=1024)
    versions = _versions(tmp_path)
    total = sum(f["size"] for f in versions[-1]["files"].values())
    adapter = 3 * (1024 * 4 + 4) * 4  # weight and bias of the last layer, with exp_avg and exp_avg_sq
    for prev, v in itertools.pairwise(versions):
        new = sum(f["size"] for n, f in v["files"].items() if n not in prev["files"])
        assert new < adapter + 200 * 1024 and new < total / 20, (new, total)


def test_rank0_only_logging_keeps_working_for_ddp(tmp_path: Path) -> None:
    """The pattern of code written before the collective API: only rank 0 calls ct.init and
    log_checkpoint.  After a short wait for other ranks it records rank 0's state (format v1)."""
    _train(2, tmp_path, kind="ddp", steps=4, every=2, only_rank0=True, env={"CKPT_TRACK_COLLECTIVE_TIMEOUT": "3"})
    versions = _versions(tmp_path)
    assert [v["step"] for v in versions] == [1, 3]
    assert {v["format_version"] for v in versions} == {1}


def test_two_nodes_with_their_own_spool_roots_make_one_version(tmp_path: Path) -> None:
    """Two "nodes" on one machine, each configured with its own local root: every rank's
    shards go into rank 0's one version (the other root is never used), and the resumed run
    continues from it on both."""
    other = tmp_path / "node1-disk"
    nodes = {1: {"CKPT_TRACK_LOCAL__ROOT": str(other)}}
    _train(2, tmp_path, kind="fsdp", steps=4, every=2, rank_env=nodes)
    assert [(v["step"], v["world_size"]) for v in _versions(tmp_path)] == [(1, 2), (3, 2)]
    assert not other.exists()
    _train(2, tmp_path, kind="fsdp", steps=6, every=2, rank_env=nodes)
    assert (tmp_path / "out" / "start1.txt").read_text() == "4"
    assert [v["step"] for v in _versions(tmp_path)] == [1, 3, 5]


def test_single_process_checkpoint_restores_into_fsdp(tmp_path: Path) -> None:
    """A format-v1 checkpoint (a plain single-process run) loads into an FSDP2 model on 2 ranks."""
    _train(1, tmp_path, kind="fsdp", steps=4, every=4, resume=False)
    assert {v["format_version"] for v in _versions(tmp_path)} == {1}
    want = _state(tmp_path, 0)
    out = tmp_path / "into2"
    out.mkdir()
    run(2, {"do": "restore", "kind": "fsdp", "ref": "local://dist/r@latest", "out": str(out)}, tmp_path, env=ENV)
    for rank in range(2):
        _assert_equal(want, load_file(out / f"rank{rank}.safetensors"))


def test_a_tracker_holds_the_version_and_every_rank_resumes_from_it(tmp_path: Path, mlflow_env, straight) -> None:
    """MLflow as the tracker: rank 0 uploads the one version; a new job resumes from the tracker
    (rank 0 downloads it, every rank reads that copy) and ends identical to a local run."""
    env = {"MLFLOW_TRACKING_URI": mlflow_env.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    tracked = tmp_path / "tracked"
    name = f"dist-{tmp_path.name}"
    _train(2, tracked, kind="fsdp", steps=4, every=2, backend="mlflow", name=name, env=env)
    _train(2, tracked, kind="fsdp", steps=8, every=2, backend="mlflow", name=name, env=env)
    assert (tracked / "out" / "start1.txt").read_text() == "4"
    _assert_equal(straight("fsdp")[1], _state(tracked, 1))
    import ckpt_track as ct

    ref = (tracked / "out" / "ref1.txt").read_text()
    assert ref == (tracked / "out" / "ref0.txt").read_text()  # every rank has the run's reference
    stored = ct.list_checkpoints(ref, ct.load_settings({"mlflow": {"tracking_uri": mlflow_env.uri}}))
    assert [s.step for s in stored] == [1, 3, 5, 7]


def test_every_rank_writes_its_shards_straight_to_the_bucket(tmp_path: Path, s3_root: str, s3_server,
                                                             straight) -> None:
    """``[storage] url``: each rank sends its own shards to the S3 server (no filesystem shared
    between the "nodes": rank 1 has its own root and cache); rank 0 commits a record; after a kill
    every rank fetches what it needs from the bucket and the run ends bit-identical."""
    env = {**s3_server.env(), "CKPT_TRACK_STORAGE__URL": s3_root}
    node1 = {1: {"CKPT_TRACK_LOCAL__ROOT": str(tmp_path / "node1"), "XDG_CACHE_HOME": str(tmp_path / "node1-cache")}}
    codes = _train(2, tmp_path, ok=False, kind="fsdp", steps=8, every=2, die_after=3, env=env, rank_env=node1)
    assert [c for c, _ in codes] == [-9, -9]
    _train(2, tmp_path, kind="fsdp", steps=8, every=2, env=env, rank_env=node1)
    assert (tmp_path / "out" / "start0.txt").read_text() == (tmp_path / "out" / "start1.txt").read_text() == "4"
    want = straight("fsdp")
    for rank in range(2):
        _assert_equal(want[rank], _state(tmp_path, rank))
    fs = s3_server.filesystem()
    prefix = s3_root.removeprefix("s3://")
    records = [json.loads(fs.cat_file(p)) for p in sorted(fs.find(f"{prefix}/records"))]
    assert sorted(r["step"] for r in records) == [1, 3, 5, 7]
    assert {(r["format_version"], r["world_size"]) for r in records} == {(2, 2)}
    assert list((tmp_path / "node1-cache" / "ckpt_track" / "objects").iterdir())  # rank 1 fetched for itself
    assert not (tmp_path / "node1").exists()  # and never needed a disk shared with rank 0
    # the store holds records, not tensors, on rank 0's disk
    assert not list((tmp_path / "ckpt_runs").rglob("*.safetensors"))
