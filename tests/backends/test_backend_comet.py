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
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import ckpt_track as ct
from ckpt_track.backends.comet import BLOB_PREFIX, RESUMED_FROM_KEY, STATE_KEY, CometBackend, model_name
from ckpt_track.backends.comet.sdk import CometSdk
from ckpt_track.errors import AuthError, BackendError, BackendNotInstalled, BackendUnavailable, ConfigError
from ckpt_track.format import MANIFEST, LocalCheckpoint, is_blob
from ckpt_track.records import RunSpec
from ckpt_track.refs import Ref, parse_ref
from ckpt_track.resolve import resolve
from ckpt_track.testing.contract import BackendContract, blob_state, make_blob_checkpoint, make_checkpoint
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
    import comet_ml  # first imported here, after the env above: it reads error-tracking settings on import

    yield fake_server
    _clean_running(comet_ml)
    assert fake_server.unhandled == [], "the SDK called endpoints the fake does not model"


def _clean_running(comet_ml: Any) -> None:
    """Close the experiment left running (Comet keeps one per process; creating one ends the last).

    ``clean()`` is the SDK's quick close: like ``end()`` it writes the offline archive, without
    ``end()``'s ~1 s wait for the offline writer thread; never leave one to comet's atexit hook.
    """
    running = comet_ml.get_running_experiment()
    if running is not None and not running.ended:
        running.clean()


def _settings(**comet: Any) -> dict[str, Any]:
    return {"backend": "comet", "comet": {"workspace": "ws", **comet}}


class TestCometContract(BackendContract):
    """Online: the SDK's Experiment and API against the loopback fake."""

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def backend(self, comet_env: FakeComet) -> Iterator[CometBackend]:
        be = CometBackend({"workspace": "ws"})
        yield be
        be.close()

    @pytest.fixture
    def settings_overrides(self, comet_env: FakeComet) -> dict[str, Any]:
        return _settings()

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        return _ui_refs()


class TestCometOfflineContract(BackendContract):
    """Offline: OfflineExperiment writes the zip; the offline store answers reads."""

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        return MALFORMED_REFS

    @pytest.fixture
    def backend(self, comet_env: FakeComet, tmp_path: Path) -> Iterator[CometBackend]:
        be = CometBackend({"workspace": "ws", "online": False, "offline_directory": str(tmp_path / "off")})
        yield be
        import comet_ml

        _clean_running(comet_ml)
        be.close()
        assert comet_env.requests == []  # offline means offline

    @pytest.fixture
    def settings_overrides(self, comet_env: FakeComet, tmp_path: Path) -> dict[str, Any]:
        return _settings(online=False, offline_directory=str(tmp_path / "off"))

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        return _ui_refs()


def _ui_refs() -> list[tuple[str, Ref]]:
    """The contract's per-backend data: experiment pages and the SDK's model URIs."""
    return [(text, ref) for text, ref, _ in REF_FORMS if not text.startswith("comet://")]


def _messages(archive: Path) -> tuple[list[dict[str, Any]], zipfile.ZipFile]:
    z = zipfile.ZipFile(archive)
    return [json.loads(line) for line in z.read("messages.json").splitlines() if line.strip()], z


def _blob_uploads(messages: list[dict[str, Any]], z: zipfile.ZipFile) -> dict[str, bytes]:
    """The content-addressed tensor files an archive uploads as experiment assets, by file name."""
    out: dict[str, bytes] = {}
    for m in messages:
        p = m["payload"] if m["type"] == "file_upload" else {}
        name = p.get("additional_params", {}).get("fileName", "")
        if p.get("upload_type") == "asset" and name.startswith(BLOB_PREFIX):
            assert name[len(BLOB_PREFIX):] not in out, "a blob was logged twice"
            out[name[len(BLOB_PREFIX):]] = z.read(p["file_path"])
    return out


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
    key = run.info.native.key
    archives = sorted(offline.glob(f"{key}*.zip"))
    assert [a.name for a in archives] == [f"{key}.zip"]
    messages, z = _messages(archives[0])
    with z:
        experiment = json.loads(z.read("experiment.json"))
        assert (experiment["workspace"], experiment["project_name"]) == ("ws", "zipcheck")
        uploads = [m["payload"] for m in messages
                   if m["type"] == "file_upload" and m["payload"]["upload_type"] == "model-element"]
        blobs = _blob_uploads(messages, z)
        for s in stored:
            name = model_name(s.version, s.step)
            mine = [p for p in uploads if p["additional_params"]["groupingName"] == name]
            files = {p["additional_params"]["fileName"]: z.read(p["file_path"]) for p in mine}
            assert files and not any(is_blob(f) for f in files)  # tensors are shared experiment assets
            files |= {f: blobs[f] for f in mine[0]["metadata"]["blobs"]}
            ckpt = Path(s.native.path)
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
    archive = offline / f"{run.info.native.key}.zip"
    assert upload_single_offline_experiment(str(archive), API_KEY, force_upload=False)
    online = ct.load_settings(_settings())
    listed = ct.list_checkpoints(run.ref, settings=online)
    assert [(s.version, s.step, "best" in s.aliases) for s in listed] == [(1, 1, True), (2, 2, False)]
    fresh = torch.nn.Linear(4, 2)
    restored = ct.restore(str(run.ref) + "@latest", model=fresh, settings=online)
    assert restored.step == 2 and torch.equal(fresh.weight, model.weight)


def test_offline_store_of_the_previous_release_still_reads(comet_env: FakeComet, tmp_path: Path) -> None:
    """The earlier layout: versions and run.json as now, the alias table, high-water mark and
    tombstones in state.json.  It lists, keeps its aliases and never reuses a version number."""
    from ckpt_track.format import copy_checkpoint

    mirror = tmp_path / "off" / "ckpt_track" / KEY
    mirror.mkdir(parents=True)
    (mirror / "run.json").write_text(json.dumps({
        "key": KEY, "workspace": "ws", "project": "old", "name": "old-run", "run_id": None,
        "created": "2024-05-01T10:00:00.000000+00:00", "config": {"lr": 0.1}}))
    for version, step in ((1, 10), (2, 20)):
        copy_checkpoint(make_checkpoint(tmp_path / "spool", step), mirror, f"v{version:06d}")
    (mirror / "state.json").write_text(json.dumps(  # v3 was deleted
        {"aliases": {"best": 1, "latest": 2, "step-10": 1, "step-20": 2}, "last_version": 3, "deleted": [3]}))
    be = CometBackend({"workspace": "ws", "online": False, "offline_directory": str(tmp_path / "off")})
    run = be.find_run(Ref("comet", "ws/old/old-run"))
    assert run.native.key == KEY and run.name == "old-run"
    assert [(s.version, s.step, s.aliases) for s in be.list(run)] == [
        (1, 10, ("best", "step-10")), (2, 20, ("latest", "step-20"))]
    attached = be.open_run(RunSpec(project="old", run_id=KEY))
    assert attached.resumed
    new = be.put(attached, make_checkpoint(tmp_path / "spool", 30), ["latest"])
    assert new.version == 4 and new.aliases == ("latest",)
    be.close()
    got = ct.restore(Ref("comet", "ws/old/old-run", alias="best"),
                     settings=ct.load_settings(_settings(online=False, offline_directory=str(tmp_path / "off"))))
    assert got.step == 10
    assert comet_env.requests == []


# -- incremental checkpoints --------------------------------------------------------------------
def _blob_of(ckpt: LocalCheckpoint, tensor: str) -> str:
    """The content-addressed file of a checkpoint that holds ``tensor``."""
    from safetensors import safe_open

    for fname in ckpt.manifest.files:
        if is_blob(fname):
            with safe_open(str(ckpt.path / fname), framework="pt") as f:
                if tensor in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    return fname
    raise KeyError(tensor)


def _json_sizes(ckpt: LocalCheckpoint) -> int:
    return ckpt.manifest.files["state.json"].size + (ckpt.path / MANIFEST).stat().st_size


def test_offline_archive_holds_each_tensor_file_once(comet_env: FakeComet, tmp_path: Path) -> None:
    """What the real SDK wrote: a checkpoint adds only its changed tensor file, an unchanged one none."""
    be = CometBackend({"workspace": "ws", "online": False, "offline_directory": str(tmp_path / "off")})
    run = be.open_run(RunSpec(project="inc", name="inc"))
    a = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0))
    b = make_blob_checkpoint(tmp_path / "spool", 2, blob_state(0, changed=("w1",)))
    c = make_blob_checkpoint(tmp_path / "spool", 3, blob_state(0, changed=("w1",)))  # b again
    stored = [be.put(run, ckpt) for ckpt in (a, b, c)]
    be.finish_run(run)
    messages, z = _messages(tmp_path / "off" / f"{run.native.key}.zip")
    with z:
        blobs = _blob_uploads(messages, z)  # each tensor file once in the whole archive
        sent: dict[int, set[str]] = {}
        for m in messages:
            if m["type"] == "file_upload":
                params = m["payload"]["additional_params"]
                sent.setdefault(params["step"], set()).add(params["fileName"])
    changed = _blob_of(b, "w1")
    assert changed not in a.manifest.files and len(a.manifest.files) == 6  # 4 tensors, 1 pack, state.json
    assert sent[1] == {"state.json", MANIFEST, *(BLOB_PREFIX + f for f in a.manifest.files if is_blob(f))}
    assert sent[2] == {"state.json", MANIFEST, BLOB_PREFIX + changed}
    assert sent[3] == {"state.json", MANIFEST}
    assert blobs[changed] == (b.path / changed).read_bytes()
    assert [s.uploaded for s in stored] == [
        a.manifest.size + (a.path / MANIFEST).stat().st_size,
        b.manifest.files[changed].size + _json_sizes(b), _json_sizes(c)]
    assert comet_env.requests == []


def test_online_blobs_are_found_again_on_resume_and_deleted_when_unreferenced(comet_env: FakeComet,
                                                                               tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    be = CometBackend({"workspace": "ws", "register_as": "inc-ckpt"})
    run = be.open_run(RunSpec(project="inc", run_id="inc-run"))
    a = make_blob_checkpoint(spool, 1, blob_state(0))
    b = make_blob_checkpoint(spool, 2, blob_state(0, changed=("w1",)))
    be.put(run, a)
    be.put(run, b)
    be.close()
    exp = comet_env.experiment(run.native.key)

    def held() -> list[str]:
        return sorted(x.file_name[len(BLOB_PREFIX):] for x in exp.assets.values() if x.type == "asset")

    assert held() == sorted({f for ckpt in (a, b) for f in ckpt.manifest.files if is_blob(f)})
    # another process attaches: the blobs the experiment holds are read from Comet, not sent again
    other = CometBackend({"workspace": "ws", "register_as": "inc-ckpt"})
    run2 = other.open_run(RunSpec(project="inc", run_id="inc-run"))
    assert run2.resumed and run2.native.key == run.native.key
    c_src = make_blob_checkpoint(spool, 3, blob_state(0, changed=("w1",)))
    assert other.put(run2, c_src).uploaded == _json_sizes(c_src)
    sa, sb, sc = other.list(run2)
    other.delete(sa)  # a's w1 file goes, nobody else names it
    assert held() == sorted(f for f in c_src.manifest.files if is_blob(f))
    other.delete(sb)  # c names every blob b named
    assert held() == sorted(f for f in c_src.manifest.files if is_blob(f))
    want = {f: (c_src.path / f).read_bytes() for f in c_src.manifest.files}
    got = other.get(sc, tmp_path / "dl")
    assert {f: (got.path / f).read_bytes() for f in want} == want
    # a registry version holds the model's elements; the tensor files come from its experiment
    (registered,) = other.list(other.find_run(Ref("comet", "registry/ws/inc-ckpt")))
    got = other.get(registered, tmp_path / "dl-registry")
    assert registered.step == 3 and {f: (got.path / f).read_bytes() for f in want} == want
    other.close()


def test_checkpoints_stored_whole_by_earlier_versions_still_work(comet_env: FakeComet, tmp_path: Path) -> None:
    """Before incremental uploads, every file (tensors too) was an element of the checkpoint's model."""
    import comet_ml

    be = CometBackend({"workspace": "ws"})
    run = be.open_run(RunSpec(project="old", name="old"))
    old = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0))
    m = old.manifest
    meta = {"ckpt_track": 1, "version": 1, "step": 1, "epoch": None, "metrics": {}, "aliases": [],
            "created": m.created, "size": m.size, "lineage": dict(m.lineage),
            "files": {**{f: e.size for f, e in m.files.items()}, MANIFEST: (old.path / MANIFEST).stat().st_size}}
    exp = comet_ml.get_running_experiment()
    exp.log_model(model_name(1, 1), str(old.path), metadata=meta, overwrite=False, prepend_folder_name=False)
    assert exp.flush()
    new_src = make_blob_checkpoint(tmp_path / "spool", 2, blob_state(0, changed=("w1",)))
    assert be.put(run, new_src).version == 2
    first, second = be.list(run)
    got = be.get(first, tmp_path / "dl-old")
    assert all((got.path / f).read_bytes() == (old.path / f).read_bytes() for f in [*m.files, MANIFEST])
    be.delete(first)  # its model elements go; the blobs v2 logged stay
    assert model_name(1, 1) not in comet_env.experiment(run.native.key).models()
    got = be.get(second, tmp_path / "dl-new")
    assert all((got.path / f).read_bytes() == (new_src.path / f).read_bytes() for f in new_src.manifest.files)
    be.close()


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


MALFORMED_REFS = [  # run through the contract (malformed_refs)
    "experiment://onlyakey",
    f"experiment://{KEY}/my-sklearn-model",
    "experiment://not-a-key/ckpt-v1-step10",
    "experiment://acme/resnet/ckpt-v1-step10",
    "experiment://acme//run/ckpt-v1-step10",
    "registry://acme",
    "registry://acme/resnet-ckpt:",
    "registry://a/b/c",
    "https://www.comet.com/acme/resnet",
    "https://www.comet.com/acme/resnet/view/abc123/panels",
    "comet://acme/resnet/x@step=abc",
    "comet://acme//x",
    f"comet://acme/resnet/{KEY}:v0",
]


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
    registry = resolve("registry://acme/resnet-ckpt:1.0.0", settings)
    with pytest.raises(BackendError, match="read-only"):
        registry.backend.set_aliases(registry.stored, ["prod"])


# -- lineage, retention, the user's own experiment ------------------------------------------
def test_resume_lineage_and_retention_online(comet_env: FakeComet) -> None:
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 2)
    settings = {**_settings(), "retention": {"keep_last": 1}}
    with ct.init(project="lin", name="first", settings=settings) as first:
        for step in (4, 5):
            first.log_checkpoint(step, model=model)
    key = first.info.native.key
    assets = comet_env.experiment(key).assets.values()
    assert {a.model for a in assets if a.type == "model-element"} == {model_name(2, 5)}  # v1 deleted
    kept = json.loads(next(a.metadata for a in assets if a.model) or "{}")["blobs"]
    assert sorted(a.file_name for a in assets if a.type == "asset") == sorted(BLOB_PREFIX + f for f in kept)
    assert json.loads(comet_env.experiment(key).others[STATE_KEY])["deleted"] == [1]
    fresh = torch.nn.Linear(4, 2)
    with ct.init(project="lin", name="second", settings=settings) as second:
        assert second.resume(model=fresh, ref=first.ref.select(step=5)) == 6
        second.log_checkpoint(6, model=fresh)
    exp = comet_env.experiment(second.info.native.key)
    source = str(first.ref.select(version=2))
    assert exp.others[RESUMED_FROM_KEY] == source  # the tracker-side lineage
    meta = json.loads(next(a.metadata for a in exp.assets.values() if a.model) or "{}")
    assert meta["lineage"]["resumed_from"] == source and meta["lineage"]["parent"] == source
    assert torch.equal(fresh.weight, model.weight)


def test_checkpoints_go_into_the_experiment_the_user_started(comet_env: FakeComet, tmp_path: Path) -> None:
    """Comet keeps one experiment per process: ckpt_track logs into the user's rather than ending it."""
    import comet_ml

    offline = tmp_path / "off"
    user = comet_ml.OfflineExperiment(project_name="mine", workspace="ws", offline_directory=str(offline))
    with ct.init(project="ignored", settings=_settings(online=False, offline_directory=str(offline))) as run:
        assert run.info.native.key == user.get_key() and run.project == "mine"
        run.log_checkpoint(1, model=torch.nn.Linear(2, 2))
    assert not user.ended  # the user's experiment stays theirs to end
    user.end()
    messages, z = _messages(offline / f"{user.get_key()}.zip")
    z.close()
    assert {m["payload"]["additional_params"].get("groupingName") for m in messages
            if m["type"] == "file_upload" and m["payload"]["upload_type"] == "model-element"} == {model_name(1, 1)}
    user2 = comet_ml.OfflineExperiment(project_name="mine", offline_directory=str(offline))
    try:
        with pytest.raises(ConfigError, match="online = false"):  # an online backend must not end it either
            CometBackend({"workspace": "ws"}).open_run(RunSpec(project="p"))
        assert not user2.ended
    finally:
        user2.clean()


# -- errors ----------------------------------------------------------------------------------
def test_missing_api_key_is_an_auth_error_naming_the_variable(comet_env: FakeComet,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMET_API_KEY")
    be = CometBackend({"workspace": "ws"})
    with pytest.raises(AuthError, match="COMET_API_KEY"):
        be.open_run(RunSpec(project="p"))
    with pytest.raises(AuthError, match="COMET_API_KEY.*online = false"):
        ct.restore(f"https://www.comet.com/ws/p/{KEY}", settings=ct.load_settings(_settings()))
    assert comet_env.requests == []


def test_wrong_api_key_is_an_auth_error(comet_env: FakeComet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_API_KEY", "0" * 32)
    be = CometBackend({"workspace": "ws"})
    with pytest.raises(AuthError, match="COMET_API_KEY") as rest:
        be.find_run(Ref("comet", f"ws/p/{KEY}"))  # the REST API answers 401
    with pytest.raises(AuthError, match="COMET_API_KEY") as handshake:
        be.open_run(RunSpec(project="p"))  # the experiment handshake answers "key not registered"
    assert rest.value.__cause__ is not None and handshake.value.__cause__ is not None


def test_unreachable_server_is_backend_unavailable(comet_env: FakeComet, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{port}/clientlib/")
    for knob in ("HTTP_SESSION_RETRY_TOTAL", "GET_OR_ADD_EXPERIMENT_RETRY_TOTAL",
                 "GET_OR_ADD_EXPERIMENT_RETRY_CONNECT"):  # the SDK's retries, so this takes ms, not minutes
        monkeypatch.setenv(f"COMET_{knob}", "0")
    be = CometBackend({"workspace": "ws"})
    with pytest.raises(BackendUnavailable, match="online = false"):
        be.find_run(Ref("comet", f"ws/p/{KEY}"))
    with pytest.raises(BackendUnavailable):
        CometBackend({"workspace": "ws"}).open_run(RunSpec(project="p"))


def test_module_needs_no_sdk_to_import_or_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import ckpt_track.backends.comet as mod

    monkeypatch.setitem(sys.modules, "comet_ml", None)  # as if comet_ml were not installed
    name = "ckpt_track.backends._comet_without_sdk"
    spec = importlib.util.spec_from_file_location(name, mod.__file__,
                                                  submodule_search_locations=[str(Path(mod.__file__).parent)])
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, fresh)
    try:
        spec.loader.exec_module(fresh)  # would raise ImportError if the SDK were imported at module level
    finally:
        for sub in [m for m in sys.modules if m.startswith(name + ".")]:
            del sys.modules[sub]
    assert fresh.CometBackend.parse_ref("registry://acme/m:1.0.0") == Ref("comet", "registry/acme/m", alias="1.0.0")
    assert parse_ref(f"https://www.comet.com/acme/resnet/{KEY}").backend == "comet"
    with pytest.raises(BackendNotInstalled, match=r"ckpt-track\[comet\]"):
        ct.restore(f"comet://acme/resnet/{KEY}")


def test_sdk_calls_we_rely_on_keep_their_signatures() -> None:
    """Not a fake (nothing is patched), but an SDK rename should fail here first."""
    import inspect

    import comet_ml

    wanted = {
        comet_ml.Experiment.log_model: {"name", "file_or_folder", "file_name", "overwrite", "metadata"},
        comet_ml.Experiment.log_asset: {"file_data", "file_name"},
        comet_ml.Experiment.log_metrics: {"dic", "step", "epoch"},
        comet_ml.Experiment.register_model: {"model_name", "version", "registry_name", "tags", "comment"},
        comet_ml.Experiment.flush: set(),
        comet_ml.OfflineExperiment.__init__: {"workspace", "project_name", "experiment_key", "offline_directory"},
        comet_ml.ExistingOfflineExperiment.__init__: {"workspace", "project_name", "experiment_key",
                                                      "offline_directory"},
        comet_ml.API.__init__: {"api_key", "cache"},
        comet_ml.config.get_api_key: {"api_key", "config"},
        comet_ml.API.get_experiment: {"workspace", "project_name", "experiment"},
        comet_ml.API.get_registry_model_details: {"workspace", "registry_name"},
        comet_ml.APIExperiment.get_model_asset_list: {"model_name"},
        comet_ml.APIExperiment.get_asset: {"asset_id", "return_type", "stream"},
        comet_ml.APIExperiment.get_asset_list: {"asset_type"},
        comet_ml.APIExperiment.get_others_summary: {"other"},
        comet_ml.APIExperiment.log_other: {"key", "value"},
        comet_ml.APIExperiment.delete_asset: {"asset_id"},
    }
    for fn, params in wanted.items():
        assert params <= set(inspect.signature(fn).parameters), fn


@pytest.mark.live
def test_live_round_trip_on_comet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """comet.com itself (or $COMET_URL_OVERRIDE): needs COMET_API_KEY and COMET_WORKSPACE."""
    if not (os.environ.get("COMET_API_KEY") and os.environ.get("COMET_WORKSPACE")):
        pytest.skip("set COMET_API_KEY and COMET_WORKSPACE to run against a real Comet")
    for var, value in _QUIET.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = _settings(workspace=os.environ["COMET_WORKSPACE"])
    model = torch.nn.Linear(4, 2)
    with ct.init(project="ckpt-track-live", settings=settings) as run:
        run.log_checkpoint(1, model=model, metrics={"val/loss": 1.0})
    fresh = torch.nn.Linear(4, 2)
    assert ct.restore(run.ref.select(step=1), model=fresh, settings=ct.load_settings(settings)).step == 1
    assert torch.equal(fresh.weight, model.weight)


def test_a_partial_upload_is_an_error_and_never_listed(comet_env: FakeComet, tmp_path: Path) -> None:
    be = CometBackend({"workspace": "ws"})
    run = be.open_run(RunSpec(project="p", name="partial"))
    first = be.put(run, make_checkpoint(tmp_path / "spool", 1), ["latest"])
    comet_env.lose_uploads.add("state.json")  # the server says 200 but keeps no file
    with pytest.raises(BackendUnavailable, match="only part of checkpoint"):
        be.put(run, make_checkpoint(tmp_path / "spool", 2), ["latest"])
    comet_env.lose_uploads.clear()
    fresh = CometBackend({"workspace": "ws"})  # what another process sees
    listed = fresh.list(fresh.find_run(run.ref))
    assert [(s.version, s.aliases) for s in listed] == [(first.version, ("latest",))]
    third = be.put(run, make_checkpoint(tmp_path / "spool", 3), ["latest"])
    assert third.version == 3  # the half-uploaded v2 is never reused
    be.close()


def test_a_lost_tensor_file_fails_put_and_is_sent_again(comet_env: FakeComet, tmp_path: Path) -> None:
    be = CometBackend({"workspace": "ws"})
    run = be.open_run(RunSpec(project="p", name="lost-blob"))
    src = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0))
    lost = _blob_of(src, "w2")
    comet_env.lose_uploads.add(BLOB_PREFIX + lost)  # the server says 200 but keeps no file
    with pytest.raises(BackendUnavailable, match="only part of checkpoint"):
        be.put(run, src)
    comet_env.lose_uploads.clear()
    assert be.list(run) == []  # its model is complete, but a tensor file it names is missing
    retry = make_blob_checkpoint(tmp_path / "spool", 2, blob_state(0))
    again = be.put(run, retry)
    assert again.uploaded == src.manifest.files[lost].size + _json_sizes(retry)  # only the lost file again
    got = be.get(be.list(run)[0], tmp_path / "dl")
    assert (got.path / lost).read_bytes() == (src.path / lost).read_bytes()
    be.close()


def test_get_links_tensor_files_an_earlier_download_holds(comet_env: FakeComet, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    be = CometBackend({"workspace": "ws"})
    run = be.open_run(RunSpec(project="inc", run_id="cache-run"))
    a = make_blob_checkpoint(tmp_path / "spool", 1, blob_state(0))
    b = make_blob_checkpoint(tmp_path / "spool", 2, blob_state(0, changed=("w1",)))
    sa, sb = be.put(run, a), be.put(run, b)
    downloaded: list[str] = []
    real = CometSdk.download_asset

    def counting(exp, asset_id, target):  # type: ignore[no-untyped-def]
        downloaded.append(target.name)
        return real(exp, asset_id, target)

    monkeypatch.setattr(CometSdk, "download_asset", staticmethod(counting))
    cache = tmp_path / "cache"  # the core's layout: one folder per version of the run
    be.get(sa, cache / "v1")
    assert len([f for f in downloaded if is_blob(f)]) == 5
    downloaded.clear()
    got = be.get(sb, cache / "v2")
    assert [f for f in downloaded if is_blob(f)] == sorted(set(b.manifest.files) - set(a.manifest.files))
    assert {f: (got.path / f).read_bytes() for f in b.manifest.files} == {
        f: (b.path / f).read_bytes() for f in b.manifest.files}
    be.close()


# -- listing projects and runs (ckpt-track runs / projects) ---------------------------------------------
def test_list_projects_and_runs_offline(comet_env: FakeComet, tmp_path: Path) -> None:
    from ckpt_track.errors import CheckpointNotFound

    be = CometBackend({"workspace": "ws", "online": False, "offline_directory": str(tmp_path / "off")})
    assert be.list_projects() == []
    first = be.open_run(RunSpec(project="resnet", name="first"))
    be.put(first, make_checkpoint(tmp_path / "spool", 1), ["latest"])
    second = be.open_run(RunSpec(project="resnet", name="second"))
    be.open_run(RunSpec(project="bert", name="b"))
    be.close()
    assert be.list_projects() == ["bert", "resnet"]
    runs = be.list_runs("resnet")
    assert [(r.run_id, r.name, r.ref) for r in runs] == [(first.run_id, "first", first.ref),
                                                         (second.run_id, "second", second.ref)]
    assert [s.step for s in be.list(runs[0])] == [1]  # each as find_run returns it
    assert be.find_run(runs[0].ref).ref == runs[0].ref
    with pytest.raises(CheckpointNotFound, match=r"'gpt'.*projects: bert, resnet"):
        be.list_runs("gpt")
    with pytest.raises(BackendError, match="online = false"):
        CometBackend({"workspace": "ws"}).list_projects()
