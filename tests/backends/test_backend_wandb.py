"""The W&B backend: the log path through the real SDK (offline), the read path through
``tests/fakes/wandb.py`` (the W&B server is Docker-only), errors through the real SDK."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from fakes.wandb import FAKED, FakeServer, FakeWandb, finished_records, md5_b64
from helpers import overwrite

import ckpt_track as ct
from ckpt_track.backends.wandb import WandbBackend
from ckpt_track.errors import AuthError, BackendUnavailable, ConfigError, InvalidRef
from ckpt_track.format import MANIFEST, STATE, LocalCheckpoint, hash_file, is_blob, load_checkpoint, verify
from ckpt_track.records import RunSpec
from ckpt_track.refs import Ref
from ckpt_track.testing.contract import BackendContract, blob_state, make_blob_checkpoint, make_checkpoint

# read before the fixtures strip WANDB_*: only the live test uses them
_LIVE_ENV = {k: v for k, v in os.environ.items() if k in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL")}
KEY = "k" * 40  # the key the fake servers accept
RUN = "3k2j1x9q"
SELF_HOSTED = "https://wandb.example.com"
LOCAL_SERVER = "http://localhost:8080"
STEPS, LOSSES = (500, 1000, 1500, 2000), (0.9, 0.4, 0.6, 0.5)  # best: step 1000


def _set_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Every W&B directory under ``home``, nothing from the developer's own set-up."""
    for key in list(os.environ):
        if key.startswith(("WANDB_", "CKPT_TRACK_")):
            mp.delenv(key)
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(home / sub))
    mp.setenv("NETRC", str(home / "netrc"))  # no key from ~/.netrc
    for var, value in (("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"), ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_DISABLE_CODE", "true"), ("WANDB_ERROR_REPORTING", "false"),
                       ("WANDB_X_DISABLE_STATS", "true"), ("WANDB_X_DISABLE_MACHINE_INFO", "true"),
                       ("WANDB_HTTP_TIMEOUT", "3"), ("WANDB_INIT_TIMEOUT", "15")):
        mp.setenv(var, value)


@pytest.fixture(scope="module", autouse=True)
def _wandb_service() -> Iterator[None]:
    yield
    wandb.teardown()  # stop the wandb-core process this module started


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _set_env(monkeypatch, tmp_path / "wandb-home")
    return tmp_path / "wandb-home"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    world = FakeWandb(FakeServer(tmp_path / "server"), FakeServer(tmp_path / "self-hosted", SELF_HOSTED))
    return world.install(monkeypatch)


def _closing(backend: WandbBackend) -> Iterator[WandbBackend]:
    yield backend
    backend.close()  # the runs a contract test leaves open, as Run.finish would


def _offline(tmp_path: Path) -> dict[str, Any]:
    return {"backend": "wandb", "wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}}


# -- the contract, three ways -----------------------------------------------------------------------
class _WandbRefs:
    """The contract's per-backend data: the web-UI and SDK forms of :data:`REFS`."""

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        return [(text, ref) for text, ref, _, _ in REFS if not text.startswith("wandb://")]


class TestWandbContract(_WandbRefs, BackendContract):
    """Online: the real SDK builds and logs every artifact; the fake server serves the reads."""

    @pytest.fixture
    def backend(self, fake: FakeWandb, tmp_path: Path) -> Iterator[WandbBackend]:
        yield from _closing(WandbBackend({"mode": "online", "dir": str(tmp_path / "wb")}))

    @pytest.fixture
    def settings_overrides(self, fake: FakeWandb, tmp_path: Path) -> dict[str, Any]:
        return {"backend": "wandb", "wandb": {"mode": "online", "dir": str(tmp_path / "wb")}}


class TestWandbOfflineContract(_WandbRefs, BackendContract):
    """Offline: all real; reads come from the store next to the offline runs."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[WandbBackend]:
        yield from _closing(WandbBackend({"mode": "offline", "dir": str(tmp_path / "wb")}))

    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict[str, Any]:
        return _offline(tmp_path)


class TestWandbDisabledContract(_WandbRefs, BackendContract):
    """Disabled: W&B is never called; checkpoints stay restorable from the store."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> WandbBackend:
        return WandbBackend({"mode": "disabled", "dir": str(tmp_path / "wb")})

    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict[str, Any]:
        return {"backend": "wandb", "wandb": {"mode": "disabled", "dir": str(tmp_path / "wb")}}


# -- the log path, for real -------------------------------------------------------------------------
def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def test_offline_log_path_records_every_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    weights: dict[int, torch.Tensor] = {}
    plan = ((100, 0.9), (200, 0.5), (201, 0.7))  # 201: weights unchanged since 200
    with ct.init(project="resnet", name="offline-run", settings=_offline(tmp_path)) as run:
        for step, loss in plan:
            if step != 201:
                with torch.no_grad():
                    model.weight.add_(1.0)
            weights[step] = model.weight.detach().clone()
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, epoch=step // 100)
    logs = sorted((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    records = finished_records(logs[0])
    assert next(r.run for r in records if r.WhichOneof("record_type") == "run").run_id == run.id
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.name, a.type) for a in arts] == [(f"ckpt-{run.id}", "model")] * 3
    aliases = [{"latest", "step-100", "best"}, {"latest", "step-200", "best"}, {"latest", "step-201"}]
    parent = None
    for a, (step, loss), expected in zip(arts, plan, aliases):
        meta = json.loads(a.metadata)
        assert (meta["step"], meta["epoch"], meta["metrics"]) == (step, step // 100, {"val/loss": loss})
        assert meta["lineage"]["run"] == str(run.ref) and meta["lineage"]["parent"] == parent
        parent = str(run.ref.select(step=step))
        assert set(a.aliases) == expected
        rebuilt = tmp_path / f"rebuilt-{step}"  # the checkpoint, from what `wandb sync` would upload
        for entry in a.manifest.contents:
            assert md5_b64(Path(entry.local_path)) == entry.digest
            assert os.path.getsize(entry.local_path) == entry.size
            (rebuilt / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry.local_path, rebuilt / entry.path)
        manifest = verify(rebuilt)  # every file byte-identical to the checkpoint's manifest
        assert {e.path for e in a.manifest.contents} == {*manifest.files, MANIFEST}
        assert hash_file(rebuilt / MANIFEST) == meta["manifest_xxh3"]
        _, tensors, _ = load_checkpoint(rebuilt)
        assert torch.equal(tensors["model/weight"], weights[step])
    shards = [{e.path: e.digest for e in a.manifest.contents if e.path.endswith(".safetensors")} for a in arts]
    assert shards[2] == shards[1] != shards[0]  # an unchanged shard keeps its MD5: W&B uploads it once
    rows = [h for h in _history(records) if "checkpoint/step" in h]
    assert [(h["checkpoint/step"], h["checkpoint/val/loss"], h["checkpoint/epoch"]) for h in rows] == \
        [(s, loss, s // 100) for s, loss in plan]
    axes = {r.metric.glob_name or r.metric.name: r.metric.step_metric
            for r in records if r.WhichOneof("record_type") == "metric"}
    assert axes.get("checkpoint/*") == "checkpoint/step"


def test_offline_resume_is_recorded_in_the_run_config(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    with ct.init(project="resnet", name="first", settings=_offline(tmp_path)) as first:
        first.log_checkpoint(10, model=model, metrics={"val/loss": 1.0})
    with ct.init(project="resnet", name="second", settings=_offline(tmp_path)) as second:
        assert second.resume(model=model, ref=first.ref) == 11
    log = next((tmp_path / "wb").glob(f"wandb/offline-run-*-{second.id}/run-{second.id}.wandb"))
    configs = [json.loads(u.value_json) for r in finished_records(log) if r.WhichOneof("record_type") == "config"
               for u in r.config.update if u.key == "ckpt_track"]
    assert configs[-1]["resumed_from"] == str(first.ref.select(version=1))
    assert configs[-1]["resumed_from_artifact"] == f"resnet/ckpt-{first.id}:v0"


def test_offline_run_synced_then_restored_online(tmp_path: Path, fake: FakeWandb) -> None:
    """Train offline, `wandb sync` (the fake replays the record log), restore from the web UI URL."""
    model = torch.nn.Linear(4, 2)
    with ct.init(project="resnet", name="airgapped", settings=_offline(tmp_path)) as run:
        for step, loss in ((1, 0.8), (2, 0.3), (3, 0.6)):
            with torch.no_grad():
                model.weight.mul_(2.0)
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
    offline = ct.list_checkpoints(run.ref, settings=ct.load_settings(_offline(tmp_path)))
    server = fake.servers["https://api.forge.coreweave.com"]
    assert server.sync(tmp_path / "wb") == [f"acme/resnet/{run.id}"]
    online = ct.load_settings({"wandb": {"mode": "online", "dir": str(tmp_path / "wb-online")}})
    synced = ct.list_checkpoints(f"https://wandb.ai/acme/resnet/runs/{run.id}", settings=online)
    assert [(s.version, s.step, s.aliases) for s in synced] == [(s.version, s.step, s.aliases) for s in offline]
    fresh = torch.nn.Linear(4, 2)
    best = ct.restore(f"acme/resnet/ckpt-{run.id}:best", model=fresh, settings=online)
    assert best.step == 2 and best.ref == f"wandb://acme/resnet/{run.id}:v2"
    latest = ct.restore(f"https://forge.coreweave.com/wandb/acme/resnet/runs/{run.id}/overview", model=fresh,
                        settings=online)
    assert latest.step == 3 and torch.equal(fresh.weight, model.weight)


def test_offline_store_written_by_the_previous_release_still_reads(tmp_path: Path) -> None:
    """That release kept the version list, the high-water mark and the alias table in run.json."""
    rdir = tmp_path / "wb" / "wandb" / "ckpt_track" / "resnet" / RUN
    for version in (1, 2, 3):  # v3 was being deleted when that release was killed: not listed
        src = make_checkpoint(tmp_path / "spool", version * 10)
        shutil.copytree(src.path, rdir / f"v{version:06d}")
    (rdir / "run.json").write_text(json.dumps({
        "run_id": RUN, "project": "resnet", "created": "2026-01-01T00:00:00.000+00:00", "config": {"lr": 0.1},
        "next_version": 4, "versions": [1, 2], "aliases": {"latest": 2, "best": 1, "step-10": 1},
        "name": "old-run", "entity": "", "mode": "offline"}))
    be = WandbBackend({"mode": "disabled", "dir": str(tmp_path / "wb")})
    run = be.find_run(Ref("wandb", f"resnet/{RUN}"))
    assert run.name == "old-run"
    assert [(s.version, s.step, s.aliases) for s in be.list(run)] == \
        [(1, 10, ("best", "step-10")), (2, 20, ("latest",))]  # the unlisted v3 is not a version
    assert not (rdir / "v000003").exists()
    assert be.get(be.list(run)[0], tmp_path / "unused").step == 10
    again = be.open_run(RunSpec(project="resnet", run_id=RUN))
    assert again.resumed and again.name == "old-run"
    new = be.put(again, make_checkpoint(tmp_path / "spool", 30), ["latest"])
    assert new.version == 4
    assert [(s.version, s.aliases) for s in be.list(again)] == [(1, ("best", "step-10")), (2, ()), (4, ("latest",))]


# -- incremental checkpoints: W&B's digest dedup -----------------------------------------------------
def _blob_versions(spool: Path) -> list[LocalCheckpoint]:
    """Three checkpoints in the incremental layout: w1 changes from the first to the second,
    nothing from the second to the third."""
    return [make_blob_checkpoint(spool, 1, blob_state(0)), make_blob_checkpoint(spool, 2, blob_state(0, ("w1",))),
            make_blob_checkpoint(spool, 3, blob_state(0, ("w1",)))]


def _small(ckpt: LocalCheckpoint) -> int:
    return ckpt.manifest.files[STATE].size + (ckpt.path / MANIFEST).stat().st_size


def _holds(ckpt: LocalCheckpoint, fname: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(ckpt.path / fname), framework="pt") as f:
        return sorted(f.keys())


def test_offline_record_log_keeps_unchanged_tensor_files_identical_across_versions(tmp_path: Path) -> None:
    be = WandbBackend({"mode": "offline", "dir": str(tmp_path / "wb")})
    run = be.open_run(RunSpec(project="resnet", run_id=RUN))
    src = _blob_versions(tmp_path / "spool")
    stored = [be.put(run, ckpt, ["latest"]) for ckpt in src]
    be.finish_run(run)
    log = next((tmp_path / "wb").glob(f"wandb/offline-run-*-{RUN}/run-{RUN}.wandb"))
    arts = [r.artifact for r in finished_records(log) if r.WhichOneof("record_type") == "artifact"]
    assert [a.name for a in arts] == [f"ckpt-{RUN}"] * 3
    tensors = [{e.path: e.digest for e in a.manifest.contents if is_blob(e.path)} for a in arts]
    assert all(set(t) == {f for f in c.manifest.files if is_blob(f)} for t, c in zip(tensors, src))  # self-contained
    kept = set(tensors[0]) & set(tensors[1])
    assert len(kept) == 4 and all(tensors[0][f] == tensors[1][f] for f in kept)  # same path, same MD5
    (old,), (new,) = set(tensors[0]) - kept, set(tensors[1]) - kept
    assert tensors[0][old] != tensors[1][new] and _holds(src[0], old) == _holds(src[1], new) == ["w1"]
    assert tensors[2] == tensors[1]  # nothing changed: every tensor file as before
    # uploaded is what W&B's dedup sends: the files whose MD5 the previous version lacks
    digests = [{e.digest: e.size for e in a.manifest.contents} for a in arts]
    assert stored[0].uploaded == sum(digests[0].values())
    for prev, cur, s in zip(digests, digests[1:], stored[1:]):
        assert s.uploaded == sum(size for d, size in cur.items() if d not in prev)
    assert stored[1].uploaded == src[1].manifest.files[new].size + _small(src[1])
    assert stored[2].uploaded == _small(src[2])  # no tensor bytes
    # on disk, the store keeps each unchanged file once (hard links), and each version whole
    v1, v2 = (Path(s.native.path) for s in stored[:2])
    assert all((v1 / f).samefile(v2 / f) for f in kept)
    be.delete(stored[0])
    assert verify(v2).step == 2


def test_online_uploaded_counts_what_the_server_receives_also_after_a_resume(tmp_path: Path,
                                                                             fake: FakeWandb) -> None:
    first, second, third = _blob_versions(tmp_path / "spool")
    be = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb")})
    run = be.open_run(RunSpec(project="resnet", run_id=RUN))
    stored = [be.put(run, first, ["latest"]), be.put(run, second, ["latest"])]
    be.finish_run(run)
    again = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb")})  # a new process: only the API knows
    resumed = again.open_run(RunSpec(project="resnet", run_id=RUN))
    stored.append(again.put(resumed, third, ["latest"]))
    again.finish_run(resumed)
    server = fake.servers["https://api.forge.coreweave.com"]
    assert [s.uploaded for s in stored] == server.received
    (changed,) = set(second.manifest.files) - set(first.manifest.files)  # w1's new tensor file
    assert stored[1].uploaded == second.manifest.files[changed].size + _small(second)
    assert stored[2].uploaded == _small(third)
    got = again.get(stored[2], tmp_path / "dl")  # every file, from that version alone
    assert {f: (got.path / f).read_bytes() for f in third.manifest.files} == \
        {f: (third.path / f).read_bytes() for f in third.manifest.files}


# -- online specifics, through the fake -----------------------------------------------------------------
def test_online_resume_uses_the_artifact_and_registry_links_best(tmp_path: Path, fake: FakeWandb) -> None:
    be = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb"), "registry": "wandb-registry-model/resnet"})
    first = be.open_run(RunSpec(project="resnet", run_id=RUN))
    a = be.put(first, make_checkpoint(tmp_path / "spool", 1, {"val/loss": 1.0}), ["latest", "step-1", "best"])
    be.put(first, make_checkpoint(tmp_path / "spool", 2, {"val/loss": 2.0}), ["latest", "step-2"])
    second = be.open_run(RunSpec(project="resnet", name="continued"))
    be.link_input(second, a)
    be.finish_run(first)
    be.finish_run(second)
    server = fake.servers["https://api.forge.coreweave.com"]
    used = server.runs[("acme", "resnet", second.run_id)].used
    assert [(v.collection[2], v.index) for v in used] == [(f"ckpt-{RUN}", 0)]
    assert server.links == [("wandb-registry-model/resnet", f"acme/resnet/ckpt-{RUN}:v0", ["best"])]
    assert a.native.artifact == f"acme/resnet/ckpt-{RUN}:v0" and str(a.ref) == f"wandb://acme/resnet/{RUN}:v1"


def test_self_hosted_base_url_round_trips_in_refs(tmp_path: Path, fake: FakeWandb) -> None:
    be = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb"), "base_url": SELF_HOSTED + "/"})
    run = be.open_run(RunSpec(project="resnet", run_id=RUN))
    stored = be.put(run, make_checkpoint(tmp_path / "spool", 5), ["latest", "step-5"])
    be.finish_run(run)
    assert str(stored.ref) == f"wandb://acme/resnet/{RUN}:v1?base_url=https%3A//wandb.example.com"
    assert ct.parse_ref(str(stored.ref)) == stored.ref
    assert (("acme", "resnet", RUN)) in fake.servers[SELF_HOSTED].runs
    assert not fake.servers["https://api.forge.coreweave.com"].runs
    got = ct.restore(stored.ref, settings=ct.load_settings({}))  # base_url comes from the ref alone
    assert got.step == 5


def test_get_reuses_a_verified_download_and_replaces_anything_else(tmp_path: Path, fake: FakeWandb) -> None:
    be = WandbBackend({"mode": "online", "dir": str(tmp_path / "wb")})
    run = be.open_run(RunSpec(project="resnet", run_id=RUN))
    one = be.put(run, make_checkpoint(tmp_path / "spool", 1), ["latest", "step-1"])
    two = be.put(run, make_checkpoint(tmp_path / "spool", 2), ["latest", "step-2"])
    be.finish_run(run)
    server = fake.servers["https://api.forge.coreweave.com"]
    dest = tmp_path / "cache" / "v1"
    assert be.get(one, dest).step == 1 and server.downloads == 1
    assert be.get(one, dest).step == 1 and server.downloads == 1  # verified copy reused
    shutil.rmtree(dest)
    shutil.copytree(be.get(two, tmp_path / "other").path, dest)  # another version where v1 belongs
    assert be.get(one, dest).step == 1 and server.downloads == 3
    overwrite(dest / "state.json", b"{}")  # damaged
    got = be.get(one, dest)
    assert server.downloads == 4 and verify(got.path).step == 1


# -- every reference form ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> FakeWandb:
    """Run RUN in acme/resnet on three fake deployments, step offsets 0, 1, 2 to tell them apart."""
    root = tmp_path_factory.mktemp("wandb-published")
    world = FakeWandb(FakeServer(root / "saas"), FakeServer(root / "example", SELF_HOSTED),
                      FakeServer(root / "local", LOCAL_SERVER))
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, root / "home")
        mp.setenv("WANDB_API_KEY", KEY)
        mp.chdir(root)
        world.install(mp)
        for offset, base_url in enumerate((None, SELF_HOSTED, LOCAL_SERVER)):
            settings = {"backend": "wandb", "blocking": True,
                        "wandb": {"mode": "online", "dir": str(root / "wb"), "base_url": base_url}}
            with ct.init(project="resnet", run_id=RUN, settings=settings) as run:
                for step, loss in zip(STEPS, LOSSES):
                    run.log_checkpoint(step + offset, model=_model(step + offset), metrics={"val/loss": loss})
    return world


def _model(step: int) -> torch.nn.Linear:
    torch.manual_seed(step)
    return torch.nn.Linear(3, 2)


# text, the canonical Ref it parses to, index into STEPS it restores, server offset
E = "acme/resnet/ckpt-" + RUN
REFS = [
    (f"wandb://acme/resnet/{RUN}", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"wandb://acme/resnet/{RUN}@best", Ref("wandb", f"acme/resnet/{RUN}", alias="best"), 1, 0),
    (f"wandb://acme/resnet/{RUN}@latest", Ref("wandb", f"acme/resnet/{RUN}", alias="latest"), 3, 0),
    (f"wandb://acme/resnet/{RUN}@step=1000", Ref("wandb", f"acme/resnet/{RUN}", step=1000), 1, 0),
    (f"wandb://acme/resnet/{RUN}@step-1500", Ref("wandb", f"acme/resnet/{RUN}", alias="step-1500"), 2, 0),
    (f"wandb://acme/resnet/{RUN}:v1", Ref("wandb", f"acme/resnet/{RUN}", version=1), 0, 0),
    (f"wandb://resnet/{RUN}@best", Ref("wandb", f"resnet/{RUN}", alias="best"), 1, 0),
    (f"wandb://acme/resnet/{RUN}@best?base_url=https://wandb.example.com",
     Ref("wandb", f"acme/resnet/{RUN}", alias="best", params=(("base_url", SELF_HOSTED),)), 1, 1),
    (f"{E}:v0", Ref("wandb", f"acme/resnet/{RUN}", version=1), 0, 0),
    (f"{E}:v3", Ref("wandb", f"acme/resnet/{RUN}", version=4), 3, 0),
    (f"{E}:best", Ref("wandb", f"acme/resnet/{RUN}", alias="best"), 1, 0),
    (f"{E}:latest", Ref("wandb", f"acme/resnet/{RUN}", alias="latest"), 3, 0),
    (f"{E}:step-500", Ref("wandb", f"acme/resnet/{RUN}", alias="step-500"), 0, 0),
    (f"resnet/ckpt-{RUN}:v2", Ref("wandb", f"resnet/{RUN}", version=3), 2, 0),
    (f"wandb-artifact://{E}:v1", Ref("wandb", f"acme/resnet/{RUN}", version=2), 1, 0),
    (f"wandb-artifact://{SELF_HOSTED}/{E}:best",
     Ref("wandb", f"acme/resnet/{RUN}", alias="best", params=(("base_url", SELF_HOSTED),)), 1, 1),
    (f"https://wandb.ai/acme/resnet/runs/{RUN}", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"https://wandb.ai/acme/resnet/runs/{RUN}/overview?nw=nwuseracme", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"https://wandb.ai/acme/resnet/runs/{RUN}/files/wandb?workspace=user-acme#logs",
     Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"https://forge.coreweave.com/wandb/acme/resnet/runs/{RUN}", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"https://forge.coreweave.com/wandb/acme/resnet/runs/{RUN}/logs", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"{SELF_HOSTED}/acme/resnet/runs/{RUN}",
     Ref("wandb", f"acme/resnet/{RUN}", params=(("base_url", SELF_HOSTED),)), 3, 1),
    (f"{LOCAL_SERVER}/acme/resnet/runs/{RUN}/overview",
     Ref("wandb", f"acme/resnet/{RUN}", params=(("base_url", LOCAL_SERVER),)), 3, 2),
    (f"https://wandb.ai/acme/resnet/artifacts/model/ckpt-{RUN}/v1",
     Ref("wandb", f"acme/resnet/{RUN}", version=2), 1, 0),
    (f"https://wandb.ai/acme/resnet/artifacts/model/ckpt-{RUN}/v0/files",
     Ref("wandb", f"acme/resnet/{RUN}", version=1), 0, 0),
    (f"https://wandb.ai/acme/resnet/artifacts/model/ckpt-{RUN}/best/overview",
     Ref("wandb", f"acme/resnet/{RUN}", alias="best"), 1, 0),
    (f"https://wandb.ai/acme/resnet/artifacts/model/ckpt-{RUN}", Ref("wandb", f"acme/resnet/{RUN}"), 3, 0),
    (f"https://forge.coreweave.com/wandb/acme/resnet/artifacts/model/ckpt-{RUN}/v2/lineage",
     Ref("wandb", f"acme/resnet/{RUN}", version=3), 2, 0),
    (f"{SELF_HOSTED}/acme/resnet/artifacts/model/ckpt-{RUN}/v2",
     Ref("wandb", f"acme/resnet/{RUN}", version=3, params=(("base_url", SELF_HOSTED),)), 2, 1),
]


@pytest.mark.parametrize("text,expected,index,offset", REFS, ids=[r[0] for r in REFS])
def test_reference_form_parses_and_restores(text: str, expected: Ref, index: int, offset: int,
                                            published: FakeWandb, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ct.parse_ref(text)
    assert ref == expected and ct.parse_ref(str(ref)) == ref
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    published.install(monkeypatch)
    model = torch.nn.Linear(3, 2)
    restored = ct.restore(text, model=model, settings=ct.load_settings({"wandb": {"mode": "online"}}))
    step = STEPS[index] + offset
    assert restored.step == step and restored.metrics == {"val/loss": LOSSES[index]}
    assert restored.ref == str(expected.run_ref().select(version=index + 1)).replace("wandb://resnet/",
                                                                                      "wandb://acme/resnet/")
    assert torch.equal(model.weight, _model(step).weight)


MALFORMED_REFS = [  # run through the contract (malformed_refs)
    "https://wandb.ai/acme/resnet/runs/",
    f"https://wandb.ai/acme/runs/{RUN}",
    f"https://wandb.ai/acme/resnet/runs/{RUN}%21",
    f"https://forge.coreweave.com/acme/resnet/runs/{RUN}",
    "https://wandb.ai/acme/resnet/artifacts/model/resnet-final/v1",
    f"https://wandb.ai/acme/resnet/artifacts/dataset/ckpt-{RUN}/v1",
    f"https://wandb.ai/acme/resnet/sweeps/{RUN}",
    f"acme/resnet/model-{RUN}:v3",
    f"acme/resnet/ckpt-{RUN}:",
    f"acme/resnet/ckpt-{RUN}:v 1",
    "acme/resnet/ckpt-:v1",
    f"wandb-artifact://acme/ckpt-{RUN}",
    f"wandb://acme/resnet/{RUN}:v0",
    f"wandb://acme/resnet/{RUN}@step=-1",
    f"wandb://acme/resnet/{RUN}@step=abc",
]


def test_find_run_rejects_paths_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(InvalidRef, match="entity"):
        WandbBackend({"mode": "offline", "dir": str(tmp_path)}).find_run(Ref("wandb", "a/b/c/d"))


# -- errors through the real SDK ----------------------------------------------------------------------------
def test_missing_api_key_is_an_auth_error_naming_the_variable() -> None:
    wandb.teardown()  # W&B keeps a key it once saw for the rest of the process; start without one
    be = WandbBackend({"mode": "online"})
    with pytest.raises(AuthError, match="WANDB_API_KEY") as info:
        be.find_run(Ref("wandb", f"acme/resnet/{RUN}"))
    assert isinstance(info.value.__cause__, wandb.errors.UsageError)
    with pytest.raises(AuthError, match="WANDB_API_KEY"):
        be.open_run(RunSpec(project="resnet"))


@pytest.fixture
def http_status_server() -> Iterator[str]:
    """A loopback HTTP server answering every request with 401 (the real SDK's own requests)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b'{"errors": [{"message": "invalid api key"}]}'
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_rejected_api_key_is_an_auth_error(http_status_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    be = WandbBackend({"mode": "online", "base_url": http_status_server})
    with pytest.raises(AuthError, match=r"HTTP 401.*WANDB_API_KEY"):
        be.find_run(Ref("wandb", f"acme/resnet/{RUN}"))


def test_unreachable_server_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "2")
    be = WandbBackend({"mode": "online", "base_url": f"http://127.0.0.1:{port}"})
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        be.find_run(Ref("wandb", f"acme/resnet/{RUN}"))


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        WandbBackend({"api_key": "secret"})
    with pytest.raises(ConfigError, match="mode"):
        WandbBackend({"mode": "sometimes"})
    assert WandbBackend({"mode": "dryrun"}).mode == "offline"
    with pytest.raises(ConfigError, match="api_key"):
        ct.load_settings({"wandb": {"api_key": "secret"}})


def test_importing_the_backend_does_not_import_the_sdk() -> None:
    code = "import sys, ckpt_track, ckpt_track.backends.wandb as w; w.WandbBackend.parse_ref('acme/p/ckpt-x:v0'); " \
           "sys.exit('wandb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_compat_shims_match_the_installed_sdk() -> None:
    """The SDK internals the backend relies on without a public API (``_compat``) still hold."""
    from ckpt_track.backends.wandb import _compat

    assert _compat.problems() == []
    with pytest.raises(_compat.RunNotFoundError):
        raise wandb.apis.public.runs.RunNotFoundError("x")
    assert _compat.is_missing_project(ValueError("Could not find project resnet"))
    assert not _compat.is_missing_project(ValueError("something else"))


# -- the fakes match the installed SDK ---------------------------------------------------------------------
def _compatible(fake: Any, real: Any) -> list[str]:
    """Every parameter the fake takes exists in the real one with the same kind and default, and
    the fake takes every parameter the real one requires."""
    f, r = inspect.signature(fake), inspect.signature(real)
    problems = []
    for name, p in f.parameters.items():
        if name == "self" and "self" not in r.parameters:
            continue  # FakeWandb.init stands in for the function wandb.init
        q = r.parameters.get(name)
        if q is None:
            problems.append(f"{name}: not in the SDK")
        elif q.kind != p.kind or q.default != p.default:
            problems.append(f"{name}: SDK has {q}, fake has {p}")
    problems += [f"{name}: required by the SDK" for name, q in r.parameters.items()
                 if q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)
                 and name not in f.parameters]
    return problems


@pytest.mark.parametrize("fake,real", FAKED, ids=[getattr(f, "__qualname__", str(f)) for f, _ in FAKED])
def test_faked_names_exist_in_the_sdk_with_compatible_signatures(fake: Any, real: Any) -> None:
    if not inspect.isclass(fake):
        assert _compatible(fake, real) == [], f"{fake.__qualname__} vs {real}"
        return
    for name, member in vars(fake).items():
        if name.startswith("_"):
            continue
        real_member = inspect.getattr_static(real, name, None)
        assert real_member is not None, f"{real.__qualname__}.{name} is not in wandb {wandb.__version__}"
        if isinstance(member, property):
            assert isinstance(real_member, property), f"{real.__qualname__}.{name} is no longer a property"
            assert (member.fset is None) or (real_member.fset is not None), f"{name} cannot be set in the SDK"
        else:
            assert _compatible(member, real_member) == [], f"{real.__qualname__}.{name}"


# -- against the real W&B cloud --------------------------------------------------------------------------------
@pytest.mark.live
@pytest.mark.skipif("WANDB_API_KEY" not in _LIVE_ENV, reason="needs WANDB_API_KEY and the network")
def test_live_round_trip_against_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _LIVE_ENV.items():
        monkeypatch.setenv(key, value)
    settings = {"backend": "wandb", "wandb": {"mode": "online", "dir": str(tmp_path / "wb")}}
    model = torch.nn.Linear(4, 2)
    with ct.init(project="ckpt-track-live", settings=settings) as run:
        for step, loss in ((1, 0.5), (2, 0.9)):
            with torch.no_grad():
                model.weight.add_(1.0)
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
    try:
        loaded = ct.load_settings(settings)
        listed = ct.list_checkpoints(run.ref, settings=loaded)
        assert [(s.version, s.step) for s in listed] == [(1, 1), (2, 2)]
        assert {"best", "step-1"} <= set(listed[0].aliases) and "latest" in listed[1].aliases
        fresh = torch.nn.Linear(4, 2)
        entity, project, run_id = run.ref.segments
        assert ct.restore(f"{entity}/{project}/ckpt-{run_id}:best", model=fresh, settings=loaded).step == 1
        assert ct.restore(run.ref, model=fresh, settings=loaded).step == 2
        assert torch.equal(fresh.weight, model.weight)
    finally:
        wandb.Api().run(run.ref.path).delete(delete_artifacts=True)


def test_offline_sweep_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A copy a killed process left in the offline store's ``.incoming`` is removed by the sweep
    the core runs before a resumed process's first upload; a live writer's copy is kept."""
    be = WandbBackend({"mode": "disabled", "dir": str(tmp_path / "wb")})
    run = be.open_run(RunSpec(project="p", name="s"))
    incoming = tmp_path / "wb" / "wandb" / "ckpt_track" / "p" / run.run_id / ".incoming"
    dead, alive = incoming / "999999999-abc", incoming / f"{os.getpid()}-def"
    for d in (dead, alive):
        d.mkdir(parents=True)
    be.sweep(run)
    assert not dead.exists() and alive.exists()


# -- listing projects and runs (ckpt-track runs / projects) ---------------------------------------------
def test_list_projects_and_runs_offline(tmp_path: Path) -> None:
    from ckpt_track.errors import BackendError, CheckpointNotFound

    be = WandbBackend({"mode": "offline", "dir": str(tmp_path / "wb")})
    assert be.list_projects() == []
    first = be.open_run(RunSpec(project="resnet", name="first"))
    be.put(first, make_checkpoint(tmp_path / "spool", 1), ["latest"])
    second = be.open_run(RunSpec(project="resnet", name="second"))
    other = be.open_run(RunSpec(project="bert", run_id=RUN))
    for run in (first, second, other):
        be.finish_run(run)
    assert be.list_projects() == ["bert", "resnet"]
    runs = be.list_runs("resnet")
    assert [(r.run_id, r.name, r.ref) for r in runs] == [(first.run_id, "first", first.ref),
                                                         (second.run_id, "second", second.ref)]
    assert [s.step for s in be.list(runs[0])] == [1]  # each as find_run returns it
    assert be.find_run(runs[0].ref) == runs[0]
    with pytest.raises(CheckpointNotFound, match=r"'gpt'.*projects: bert, resnet"):
        be.list_runs("gpt")
    with pytest.raises(BackendError, match="offline"):
        WandbBackend({"mode": "online"}).list_projects()
