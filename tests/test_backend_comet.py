"""The Comet backend against the real comet_ml SDK.

Online, the SDK talks to a loopback fake of the Comet server (``tests/fakes/comet.py``):
nothing in the SDK is patched, so ``Experiment``, ``API`` and ``comet upload`` run
their own code, and the contract's puts go through the SDK's real upload path.
Offline, the SDK writes its real ``<key>.zip``, which a test opens and checks byte
for byte, and ``comet upload`` (``upload_single_offline_experiment``) replays it
into the fake, where it is restored online.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comet_ml
import pytest
import torch
import xxhash

import ckpt_track as ct
from ckpt_track.backends.base import RunSpec
from ckpt_track.backends.comet import RESUMED_FROM_KEY, STATE_KEY, CometBackend, model_name
from ckpt_track.errors import AuthError, BackendUnavailable, CheckpointNotFound, InvalidRef
from ckpt_track.format import MANIFEST
from ckpt_track.refs import Ref, parse_ref
from ckpt_track.resolve import resolve
from ckpt_track.testing.contract import BackendContract, make_checkpoint
from tests.fakes.comet import API_KEY, FakeComet

KEY = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # a realistic experiment key (32 hex)
_QUIET = {  # the SDK's own extras: off, so tests are fast and start no threads or subprocesses
    "COMET_AUTO_LOG_ENV_DETAILS": "false", "COMET_AUTO_LOG_GIT_METADATA": "false",
    "COMET_AUTO_LOG_GIT_PATCH": "false", "COMET_AUTO_LOG_CODE": "false", "COMET_AUTO_LOG_GRAPH": "false",
    "COMET_AUTO_LOG_CLI_ARGUMENTS": "false", "COMET_AUTO_LOG_PARAMETERS": "false",
    "COMET_AUTO_LOG_METRICS": "false", "COMET_AUTO_LOG_CO2": "false", "COMET_AUTO_LOG_OUTPUT_LOGGER": "",
    "COMET_DISPLAY_SUMMARY_LEVEL": "0", "COMET_DISABLE_ANNOUNCEMENT": "true", "COMET_ERROR_TRACKING_ENABLE": "false",
    # no fallback-to-offline streamer: it spends ~0.7 s joining its writer thread at every end()
    "COMET_FALLBACK_STREAMER_FALLBACK_TO_OFFLINE_MIN_BACKEND_VERSION": "999.0.0",
}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeComet]:
    fake = FakeComet().start()
    yield fake
    fake.stop()


@pytest.fixture
def comet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_server: FakeComet) -> Iterator[FakeComet]:
    """The SDK pointed at the fake, with its config, temp and offline dirs under tmp_path."""
    fake_server.reset()
    for var in ("COMET_WORKSPACE", "COMET_PROJECT_NAME", "COMET_EXPERIMENT_KEY", "COMET_ONLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {**_QUIET, "COMET_API_KEY": API_KEY, "COMET_URL_OVERRIDE": fake_server.clientlib_url,
                       "COMET_CONFIG": str(tmp_path / "no.comet.config"),
                       "COMET_OFFLINE_DIRECTORY": str(tmp_path / "comet-offline")}.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the SDK's per-experiment temp dirs
    yield fake_server
    running = comet_ml.get_running_experiment()
    if running is not None and not running.ended:
        running.end()  # never leave one for comet's atexit hook (it would call a stopped server)
    assert fake_server.unhandled == [], "the SDK called endpoints the fake does not model"


def _settings(**comet: Any) -> dict[str, Any]:
    return {"backend": "comet", "comet": {"workspace": "ws", **comet}}


class TestCometContract(BackendContract):
    """Online: the SDK's Experiment and API against the loopback fake."""

    @pytest.fixture
    def backend(self, comet_env: FakeComet) -> Iterator[CometBackend]:
        be = CometBackend({"workspace": "ws"})
        yield be
        be.close()

    @pytest.fixture
    def settings_overrides(self, comet_env: FakeComet) -> dict[str, Any]:
        return _settings()


class TestCometOfflineContract(BackendContract):
    """Offline: OfflineExperiment writes the zip; the offline store answers reads."""

    @pytest.fixture
    def backend(self, comet_env: FakeComet, tmp_path: Path) -> Iterator[CometBackend]:
        be = CometBackend({"workspace": "ws", "online": False, "offline_directory": str(tmp_path / "off")})
        yield be
        be.close()
        assert comet_env.requests == []  # offline means offline

    @pytest.fixture
    def settings_overrides(self, comet_env: FakeComet, tmp_path: Path) -> dict[str, Any]:
        return _settings(online=False, offline_directory=str(tmp_path / "off"))


def _messages(archive: Path) -> tuple[list[dict[str, Any]], zipfile.ZipFile]:
    z = zipfile.ZipFile(archive)
    return [json.loads(line) for line in z.read("messages.json").splitlines() if line.strip()], z


def test_offline_log_path_records_every_checkpoint_in_the_archive(comet_env: FakeComet, tmp_path: Path) -> None:
    """The real SDK offline: the zip holds every checkpoint's files, step, metrics, aliases, lineage."""
    offline = tmp_path / "off"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    settings = _settings(online=False, offline_directory=str(offline), register_as="resnet-ckpt")
    with ct.init(project="zipcheck", name="zip-run", settings=settings, monitor="val/loss") as run:
        stored = []
        for step, loss in ((10, 0.9), (20, 0.4), (30, 0.6)):
            with torch.no_grad():
                model.weight.add_(1.0)
            stored.append(run.log_checkpoint(step, model=model, metrics={"val/loss": loss}, epoch=step // 10,
                                             blocking=True).wait())
    key = run.info.native["key"]
    archives = sorted(offline.glob(f"{key}*.zip"))
    assert [a.name for a in archives] == [f"{key}.zip"]
    messages, z = _messages(archives[0])
    with z:
        experiment = json.loads(z.read("experiment.json"))
        assert (experiment["workspace"], experiment["project_name"]) == ("ws", "zipcheck")
        uploads = [m["payload"] for m in messages
                   if m["type"] == "file_upload" and m["payload"]["upload_type"] == "model-element"]
        for s in stored:
            name = model_name(s.version, s.step)
            mine = [p for p in uploads if p["additional_params"]["groupingName"] == name]
            files = {p["additional_params"]["fileName"]: z.read(p["file_path"]) for p in mine}
            ckpt = Path(s.native["path"])
            manifest = json.loads((ckpt / MANIFEST).read_bytes())
            assert files == {f: (ckpt / f).read_bytes() for f in [*manifest["files"], MANIFEST]}
            for fname, entry in manifest["files"].items():  # the archive's bytes are the committed ones
                assert xxhash.xxh3_128(files[fname]).hexdigest() == entry["hash"]
            assert {p["additional_params"]["step"] for p in mine} == {s.step}
            meta = mine[0]["metadata"]
            assert all(p["metadata"] == meta for p in mine)
            assert (meta["version"], meta["step"], meta["epoch"]) == (s.version, s.step, s.step // 10)
            assert meta["metrics"] == manifest["metrics"] == dict(s.metrics)
            assert meta["lineage"] == manifest["lineage"] and meta["lineage"]["run"] == str(run.ref)
            assert set(meta["aliases"]) >= {"latest", f"step-{s.step}"}
        assert [meta["lineage"]["parent"] for meta in
                [next(p["metadata"] for p in uploads if p["metadata"]["version"] == s.version) for s in stored]] == \
            [None, str(run.ref.select(step=10)), str(run.ref.select(step=20))]
        metrics = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]): m["payload"]["metric"]["metricValue"]
                   for m in messages if m["type"] == "metric_msg"}
        assert {k: v for k, v in metrics.items() if k[0] == "val/loss"} == {
            ("val/loss", 10): 0.9, ("val/loss", 20): 0.4, ("val/loss", 30): 0.6}
        others = [m["payload"] for m in messages if m["type"] == "log_other"]
        state = json.loads([o["value"] for o in others if o["key"] == STATE_KEY][-1])
        assert state["aliases"] == {"latest": 3, "best": 2, "step-10": 1, "step-20": 2, "step-30": 3}
        assert [o["value"] for o in others if o["key"] == "Name"] == ["zip-run"]
        registered = [m["payload"] for m in messages if m["type"] == "register_model"]
        assert [(r["model_name"], r["registry_name"]) for r in registered] == [
            (model_name(s.version, s.step), "resnet-ckpt") for s in stored]
    # and the offline store restores by step without any upload
    fresh = torch.nn.Linear(4, 2)
    restored = ct.restore(run.ref.select(step=20), model=fresh, settings=ct.load_settings(settings))
    assert restored.step == 20 and restored.metrics == {"val/loss": 0.4}
    assert comet_env.requests == []


def test_comet_upload_makes_offline_checkpoints_restorable_online(comet_env: FakeComet, tmp_path: Path) -> None:
    """`comet upload` (the SDK's OfflineSender) replays the archive; the online read path restores it."""
    from comet_ml.offline import upload_single_offline_experiment

    offline = tmp_path / "off"
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 2)
    with ct.init(project="up", name="up-run", settings=_settings(online=False, offline_directory=str(offline)),
                 monitor="val/loss") as run:
        for step, loss in ((1, 0.5), (2, 0.7)):
            with torch.no_grad():
                model.weight.mul_(2.0)
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
    archive = offline / f"{run.info.native['key']}.zip"
    assert upload_single_offline_experiment(str(archive), API_KEY, force_upload=False)
    online = ct.load_settings(_settings())
    listed = ct.list_checkpoints(run.ref, settings=online)
    assert [(s.version, s.step, "best" in s.aliases) for s in listed] == [(1, 1, True), (2, 2, False)]
    fresh = torch.nn.Linear(4, 2)
    restored = ct.restore(str(run.ref) + "@latest", model=fresh, settings=online)
    assert restored.step == 2 and torch.equal(fresh.weight, model.weight)


# -- references ---------------------------------------------------------------------------
REF_FORMS = [
    (f"comet://acme/resnet/{KEY}@best", Ref("comet", f"acme/resnet/{KEY}", alias="best"), 20),
    (f"comet://acme/resnet/{KEY}@step=10", Ref("comet", f"acme/resnet/{KEY}", step=10), 10),
    (f"comet://acme/resnet/{KEY}:v3", Ref("comet", f"acme/resnet/{KEY}", version=3), 30),
    (f"comet://acme/resnet/{KEY}", Ref("comet", f"acme/resnet/{KEY}"), 30),
    (f"comet://resnet/{KEY}@latest", Ref("comet", f"resnet/{KEY}", alias="latest"), 30),
    ("comet://acme/resnet/resnet-baseline@step=20", Ref("comet", "acme/resnet/resnet-baseline", step=20), 20),
    (f"https://www.comet.com/acme/resnet/{KEY}", Ref("comet", f"acme/resnet/{KEY}"), 30),
    (f"https://www.comet.com/acme/resnet/{KEY}?experiment-tab=assets&assetId=1f2e3d",
     Ref("comet", f"acme/resnet/{KEY}"), 30),
    (f"https://comet.com/acme/resnet/{KEY}/", Ref("comet", f"acme/resnet/{KEY}"), 30),
    (f"experiment://{KEY}/ckpt-v2-step20", Ref("comet", KEY, version=2), 20),
    ("experiment://acme/resnet/resnet-baseline/ckpt-v1-step10", Ref("comet", "acme/resnet/resnet-baseline", version=1), 10),
    ("registry://acme/resnet-ckpt", Ref("comet", "registry/acme/resnet-ckpt"), 30),
    ("registry://acme/resnet-ckpt:2.0.0", Ref("comet", "registry/acme/resnet-ckpt", alias="2.0.0"), 20),
    ("comet://registry/acme/resnet-ckpt:v1", Ref("comet", "registry/acme/resnet-ckpt", version=1), 10),
    ("comet://registry/acme/resnet-ckpt@best", Ref("comet", "registry/acme/resnet-ckpt", alias="best"), 20),
]


@pytest.mark.parametrize("text,expected,step", REF_FORMS, ids=[f[0] for f in REF_FORMS])
def test_reference_forms_parse_to_canonical_refs(text: str, expected: Ref, step: int) -> None:
    ref = parse_ref(text)
    assert ref == expected
    assert parse_ref(str(ref)) == ref  # the canonical form round-trips


def test_self_hosted_url_keeps_its_host() -> None:
    ref = parse_ref(f"https://comet.acme.internal:8443/acme/resnet/{KEY}?experiment-tab=panels")
    assert ref == Ref("comet", f"acme/resnet/{KEY}", params=(("url", "https://comet.acme.internal:8443"),))
    assert str(ref) == f"comet://acme/resnet/{KEY}?url=https%3A//comet.acme.internal%3A8443"
    assert parse_ref(str(ref)) == ref


@pytest.mark.parametrize("text", [
    "experiment://onlyakey",
    f"experiment://{KEY}/my-sklearn-model",
    "experiment://not-a-key/ckpt-v1-step10",
    "experiment://acme/resnet/ckpt-v1-step10",
    f"experiment://acme//run/ckpt-v1-step10",
    "registry://acme",
    "registry://acme/resnet-ckpt:",
    "registry://a/b/c",
    "https://www.comet.com/acme/resnet",
    "https://www.comet.com/acme/resnet/view/abc123/panels",
    "comet://acme/resnet/x@step=abc",
    "comet://acme//x",
    f"comet://acme/resnet/{KEY}:v0",
])
def test_malformed_references_raise_invalid_ref(text: str) -> None:
    with pytest.raises(InvalidRef):
        parse_ref(text)


def test_every_reference_form_restores_through_the_fake(comet_env: FakeComet, tmp_path: Path) -> None:
    be = CometBackend({"workspace": "acme", "register_as": "resnet-ckpt"})
    run = be.open_run(RunSpec(project="resnet", name="resnet-baseline", run_id=KEY))
    assert run.ref == Ref("comet", f"acme/resnet/{KEY}") and run.run_id == KEY
    for step, loss in ((10, 0.9), (20, 0.3), (30, 0.5)):
        aliases = ["latest", f"step-{step}", *(["best"] if step != 30 else [])]
        be.put(run, make_checkpoint(tmp_path / "spool", step, {"val/loss": loss}), aliases)
    be.finish_run(run)
    assert sorted(v["version"] for v in comet_env.registry[("acme", "resnet-ckpt")]) == ["1.0.0", "2.0.0", "3.0.0"]
    settings = ct.load_settings(_settings(workspace="acme"))
    forms = [*((t, s) for t, _, s in REF_FORMS), (f"{comet_env.url}/acme/resnet/{KEY}", 30)]
    for text, step in forms:
        found = resolve(text, settings)
        got = found.fetch()
        assert got.step == step, text
        assert found.stored.ref.version == found.stored.version, text
        assert parse_ref(str(found.stored.ref)) == found.stored.ref, text
