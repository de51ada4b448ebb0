"""The public API on the local backend: logging, selectors, listing, errors, retention, lineage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import mlp, overwrite

import ckpt_track as ct
from ckpt_track.errors import (
    BackendNotInstalled,
    CheckpointNotFound,
    CheckpointWriteError,
    ConfigError,
    IntegrityError,
    InvalidRef,
    SerializationError,
    UnknownBackend,
)

LOSSES = {10: 0.9, 20: 0.4, 30: 0.6, 40: 0.5}


def _model(seed: int = 0) -> torch.nn.Module:
    return mlp((6, 5, 2), seed, norm=True)


@pytest.fixture
def logged(tmp_path: Path) -> tuple[ct.Run, dict[int, dict[str, torch.Tensor]]]:
    """A run with four checkpoints; returns it and the model weights at each step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    snapshots = {}
    with ct.init(project="proj", name="run1", config={"lr": 0.01}) as run:
        for step, loss in LOSSES.items():
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
            run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": loss}, epoch=step // 20)
    return run, snapshots


def _weights_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "selector,step",
    [("@step=30", 30), ("@latest", 40), ("", 40), ("@best", 20), ("@step-10", 10), (":v3", 30)],
)
def test_restore_by_selector(logged, selector: str, step: int) -> None:
    run, snaps = logged
    model = _model(seed=99)
    restored = ct.restore(f"{run.ref}{selector}", model=model)
    assert restored.step == step
    assert restored.metrics == {"val/loss": LOSSES[step]}
    assert restored.epoch == step // 20
    assert _weights_equal(model, snaps[step])


def test_restore_by_run_name(logged) -> None:
    run, snaps = logged
    model = _model(seed=5)
    assert ct.restore("local://proj/run1@step=20", model=model).step == 20
    assert _weights_equal(model, snaps[20])


def test_listing_shows_steps_metrics_aliases_sizes(logged) -> None:
    run, _ = logged
    listed = ct.list_checkpoints(run.ref)
    assert [s.step for s in listed] == [10, 20, 30, 40]
    assert [s.version for s in listed] == [1, 2, 3, 4]
    assert [s.metrics["val/loss"] for s in listed] == list(LOSSES.values())
    assert "best" in listed[1].aliases and "latest" in listed[3].aliases
    assert all(f"step-{s.step}" in s.aliases for s in listed)
    assert all(s.size > 1000 for s in listed) and all(s.created for s in listed)


def test_handle_reports_ref_and_stored(tmp_path: Path) -> None:
    model = _model()
    with ct.init(project="proj") as run:
        handle = run.log_checkpoint(5, model=model)
        assert handle.ref == run.ref.select(step=5)
        stored = handle.wait()
        assert stored.step == 5 and stored.version == 1
        assert handle.done()


def test_module_level_log_checkpoint_uses_active_run() -> None:
    with pytest.raises(ConfigError, match="no active run"):
        ct.log_checkpoint(1, model=_model())
    run = ct.init(project="proj")
    ct.log_checkpoint(1, model=_model()).wait()
    run.finish()
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [1]


def test_best_follows_mode_max() -> None:
    with ct.init(project="proj", monitor="acc", mode="max") as run:
        for step, acc in ((1, 0.5), (2, 0.8), (3, 0.7)):
            run.log_checkpoint(step, model=_model(), metrics={"acc": acc})
    assert ct.restore(f"{run.ref}@best").step == 2


# -- bad input --------------------------------------------------------------------------
def test_unknown_step_lists_available_steps(logged) -> None:
    run, _ = logged
    with pytest.raises(CheckpointNotFound, match="available steps: 10, 20, 30, 40"):
        ct.restore(f"{run.ref}@step=25", model=_model())


def test_unknown_run_lists_runs(logged) -> None:
    with pytest.raises(CheckpointNotFound, match="run1"):
        ct.restore("local://proj/nosuchrun", model=_model())


def test_malformed_ref() -> None:
    with pytest.raises(InvalidRef, match="see `ckpt-track refs` for every form"):
        ct.restore("proj/run1@best", model=_model())


def _stored_file(run: ct.Run, step: int, suffix: str) -> Path:
    stored = next(s for s in ct.list_checkpoints(run.ref) if s.step == step)
    return next(Path(stored.native.path).glob(f"*{suffix}"))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_raises_integrity_error_and_loads_nothing(logged, damage: str) -> None:
    run, snaps = logged
    path = _stored_file(run, 30, ".safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01
    else:
        data = data[: len(data) // 2]
    overwrite(path, bytes(data))
    model = _model(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IntegrityError, match=path.name):
        ct.restore(f"{run.ref}@step=30", model=model)
    assert _weights_equal(model, before)
    ct.restore(f"{run.ref}@step=20", model=model)  # the others are untouched
    assert _weights_equal(model, snaps[20])


def test_tampered_state_json_is_caught(logged) -> None:
    run, _ = logged
    path = _stored_file(run, 40, "state.json")
    overwrite(path, path.read_bytes().replace(b'"step": 40', b'"step": 41'))
    with pytest.raises(IntegrityError, match="state.json"):
        ct.restore(run.ref, model=_model())


def test_half_written_checkpoint_is_never_listed_or_restored(logged) -> None:
    run, _ = logged
    vdir = Path(ct.list_checkpoints(run.ref)[-1].native.path)
    half = vdir.with_name("v000005")
    half.mkdir()
    for f in vdir.iterdir():
        if f.name != "manifest.json":
            (half / f.name).write_bytes(f.read_bytes())
    assert [s.version for s in ct.list_checkpoints(run.ref)] == [1, 2, 3, 4]
    with pytest.raises(CheckpointNotFound):
        ct.restore(f"{run.ref}:v5", model=_model())
    assert ct.restore(run.ref, model=_model()).step == 40


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(UnknownBackend, match="known backends: .*local.*mlflow"):
        ct.init(project="p", backend="mlfow")


def test_missing_sdk_names_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(BackendNotInstalled, match=r"pip install 'ckpt-track\[wandb\]'") as info:
        ct.init(project="p", backend="wandb")
    assert isinstance(info.value, ImportError)


def test_import_does_not_import_tracker_sdks() -> None:
    code = ("import sys, ckpt_track, ckpt_track.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow','wandb','clearml','comet_ml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "extra,where",
    [({"fn": lambda: 1}, "extra/fn"), ({"a": {"b": {1, 2}}}, "extra/a/b"), ({"o": object()}, "extra/o")],
)
def test_non_serializable_extra_fails_at_log_time(extra, where: str) -> None:
    with ct.init(project="p") as run:
        with pytest.raises(SerializationError, match=where):
            run.log_checkpoint(1, model=_model(), extra=extra)
        assert run.checkpoints() == []


def test_bad_metric_and_step_fail_at_log_time() -> None:
    with ct.init(project="p") as run:
        with pytest.raises(SerializationError, match="val/loss"):
            run.log_checkpoint(1, metrics={"val/loss": "low"})
        with pytest.raises(ConfigError, match="step"):
            run.log_checkpoint(-1)
        with pytest.raises(ConfigError, match="managed by ckpt_track"):
            run.log_checkpoint(1, aliases=["best"])


def test_refused_upload_never_stops_the_loop_and_is_retried_by_the_next_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker that refuses a checkpoint (a permanent error): the loop goes on, the handle
    and finish() report it, the checkpoint stays in the spool, and the next process stores it."""
    from ckpt_track.backends.local import LocalBackend

    real_put = LocalBackend.put

    def broken_put(self, run, ckpt, aliases=()):
        if ckpt.step == 1:
            raise OSError(28, "No space left on device")
        return real_put(self, run, ckpt, aliases)

    run = ct.init(project="p", name="refused")
    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "put", broken_put)
        first = run.log_checkpoint(1, model=_model())
        with pytest.raises(CheckpointWriteError, match="No space left") as info:
            first.wait()
        run.log_checkpoint(2, model=_model()).wait()  # the loop is not stopped
        with pytest.raises(CheckpointWriteError, match=r"step 1 refused by local: \[Errno 28\] No space left"):
            run.finish()
    kept = Path(re.search(r"kept at (\S+?);", str(info.value)).group(1))
    assert (kept / "manifest.json").is_file()  # nothing lost: the checkpoint waits in the spool
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [2]
    again = ct.init(project="p", name="refused")
    again.finish()  # the refused one is tried again, and now lands
    listed = ct.list_checkpoints(run.ref)
    assert sorted(s.step for s in listed) == [1, 2]
    assert "latest" in next(s for s in listed if s.step == 2).aliases  # an older step never takes latest
    assert not list((Path("ckpt_runs") / ".spool").iterdir())


def test_failure_surfaces_at_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_track.backends.local import LocalBackend

    run = ct.init(project="p")
    monkeypatch.setattr(LocalBackend, "put", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    run.log_checkpoint(1, model=_model())
    with pytest.raises(CheckpointWriteError, match="disk gone"):
        run.finish()


def test_blocking_save_raises_immediately(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_track.backends.local import LocalBackend

    run = ct.init(project="p")
    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "put", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(CheckpointWriteError, match="disk gone"):
            run.log_checkpoint(1, model=_model(), blocking=True)
    run.finish()


def test_exit_flushes_pending_save(tmp_path: Path) -> None:
    code = ("import torch, ckpt_track as ct\n"
            "run = ct.init(project='p', name='atexit')\n"
            "run.log_checkpoint(7, model=torch.nn.Linear(300, 300))\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    assert [s.step for s in ct.list_checkpoints("local://p/atexit")] == [7]


# -- resume ---------------------------------------------------------------------------------
def test_resume_modes_and_return_value(logged) -> None:
    run, snaps = logged
    again = ct.init(project="proj", name="run1")
    assert again.resumed and again.id == run.id
    model = _model(seed=3)
    assert again.resume(model=model) == 41
    assert _weights_equal(model, snaps[40])
    again.finish()
    fresh = ct.init(project="proj", name="run1", resume="never")
    assert not fresh.resumed and fresh.id != run.id and fresh.resume(model=model) == 0
    fresh.finish()
    with pytest.raises(CheckpointNotFound):
        ct.init(project="proj", name="nope", resume="must")
    with pytest.raises(ConfigError):
        ct.init(project="proj", run_id=run.id, resume="never")


def test_lineage_in_manifest(logged, tmp_path: Path) -> None:
    run, _ = logged
    listed = ct.list_checkpoints(run.ref)
    first, second = listed[0].lineage, listed[1].lineage
    assert first["parent"] is None and second["parent"] == f"{run.ref}@step=10"
    assert first["run"] == str(run.ref) and len(first["config_hash"]) == 16
    assert first["versions"]["torch"] == torch.__version__ and first["host"]
    # resume from another run: resumed_from crosses runs
    with ct.init(project="proj", name="run2") as run2:
        assert run2.resume(model=_model(), ref=f"{run.ref}@best") == 21
        run2.log_checkpoint(21, model=_model())
    lin = ct.list_checkpoints(run2.ref)[0].lineage
    assert lin["resumed_from"] == f"{run.ref}:v2" and lin["parent"] == f"{run.ref}:v2"


def test_git_commit_and_dirty_flag_recorded(tmp_path: Path) -> None:
    from ckpt_track import provenance as lineage

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "train.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    lineage.git_info.cache_clear()
    assert lineage.git_info(str(repo)) == {"commit": head, "dirty": False}
    (repo / "train.py").write_text("x = 2\n")
    lineage.git_info.cache_clear()
    assert lineage.git_info(str(repo)) == {"commit": head, "dirty": True}
    lineage.git_info.cache_clear()
    assert lineage.git_info(str(tmp_path)) is None


# -- retention ---------------------------------------------------------------------------------
def test_retention_keeps_last_and_best_never_latest_or_best() -> None:
    losses = [0.9, 0.2, 0.8, 0.7, 0.6, 0.5]
    settings = {"retention": {"keep_last": 2, "keep_best": 1}}
    with ct.init(project="p", settings=settings) as run:
        for i, loss in enumerate(losses):
            run.log_checkpoint(i, model=_model(), metrics={"val/loss": loss})
    kept = ct.list_checkpoints(run.ref)
    assert [s.step for s in kept] == [1, 4, 5]
    assert "best" in kept[0].aliases and "latest" in kept[-1].aliases


def test_retention_keep_every_and_user_aliases() -> None:
    settings = {"retention": {"keep_last": 1, "keep_every": 4}}
    with ct.init(project="p", settings=settings) as run:
        for i in range(9):
            run.log_checkpoint(i, model=_model(), aliases=["pinned"] if i == 3 else [])
    assert [s.step for s in ct.list_checkpoints(run.ref)] == [0, 3, 4, 8]


# -- config switching ---------------------------------------------------------------------------
PLUGIN = '''
from ckpt_track.backends.local import LocalBackend

class MirrorBackend(LocalBackend):
    """A third-party backend: a local store under another name."""
    name = "mirror"
'''


@pytest.fixture
def mirror_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a real entry-point plugin 'mirror' (a dist-info on sys.path)."""
    from ckpt_track.backends import registry

    site = tmp_path / "site"
    (site / "mirror_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "mirror_plugin.py").write_text(PLUGIN)
    (site / "mirror_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mirror-plugin\nVersion: 1.0\n")
    (site / "mirror_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[ckpt_track.backends]\nmirror = mirror_plugin:MirrorBackend\n")
    monkeypatch.syspath_prepend(str(site))
    registry._plugins.cache_clear()
    yield
    registry._plugins.cache_clear()


def _backend_of_new_run(**kwargs) -> str:
    run = ct.init(project="p", **kwargs)
    run.finish()
    return run.info.backend


def test_entry_point_plugin_is_a_backend(mirror_plugin) -> None:
    from ckpt_track.backends import registry

    assert "mirror" in registry.names()
    with ct.init(project="p", backend="mirror") as run:
        run.log_checkpoint(3, model=_model())
    assert run.ref.backend == "mirror"
    assert ct.restore(f"{run.ref}@step=3", model=_model()).step == 3


def test_config_precedence_kwarg_env_toml_pyproject(mirror_plugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "proj" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert _backend_of_new_run() == "local"  # default
    (tmp_path / "proj" / "pyproject.toml").write_text('[project]\nname="x"\n[tool.ckpt_track]\nbackend = "mirror"\n')
    assert _backend_of_new_run() == "mirror"  # pyproject.toml, found upward
    (tmp_path / "proj" / "ckpt_track.toml").write_text('backend = "local"\n')
    assert _backend_of_new_run() == "local"  # ckpt_track.toml beats pyproject
    monkeypatch.setenv("CKPT_TRACK_BACKEND", "mirror")
    assert _backend_of_new_run() == "mirror"  # env beats files
    assert _backend_of_new_run(backend="local") == "local"  # kwarg beats env


def test_config_typo_is_an_error_with_suggestion(tmp_path: Path) -> None:
    (tmp_path / "ckpt_track.toml").write_text('[retention]\nkeep_lats = 3\n')
    with pytest.raises(ConfigError, match="keep_last"):
        ct.init(project="p")


def test_local_root_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt_track.toml").write_text(f'[local]\nroot = "{tmp_path / "elsewhere"}"\n')
    with ct.init(project="p") as run:
        run.log_checkpoint(1, model=_model())
    assert (tmp_path / "elsewhere" / "p" / run.id / "run.json").is_file()
    monkeypatch.chdir(tmp_path.parent)  # another cwd: the ref's root parameter still finds it
    ref = run.ref.with_params({"root": str(tmp_path / "elsewhere")})
    assert ct.restore(ref, model=_model()).step == 1
    assert json.loads((tmp_path / "elsewhere" / "p" / run.id / "run.json").read_text())["project"] == "p"


def test_unreachable_tracker_defers_uploads_without_breaking_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker that is down: the loop goes on, nothing is lost, the next run uploads."""
    from ckpt_track.backends.local import LocalBackend
    from ckpt_track.errors import BackendUnavailable

    def down(self, run, ckpt, aliases=()):
        raise BackendUnavailable("tracker at http://127.0.0.1:1 is unreachable")

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "put", down)
        run = ct.init(project="p", name="flaky")
        for step in (1, 2, 3):
            handle = run.log_checkpoint(step, model=_model(), metrics={"val/loss": 1.0 / step})
        assert handle.wait() is None  # deferred, not failed
        with pytest.raises(CheckpointWriteError, match="3 checkpoint\\(s\\) could not be uploaded"):
            run.finish()
    assert ct.list_checkpoints(run.ref) == []
    again = ct.init(project="p", name="flaky")  # the tracker is back: owed uploads go first, in order
    assert again.id == run.id
    again.wait()
    listed = ct.list_checkpoints(run.ref)
    assert [s.step for s in listed] == [1, 2, 3]
    assert "best" in listed[2].aliases and "latest" in listed[2].aliases
    again.finish()
    assert not list((Path("ckpt_runs") / ".spool").iterdir())  # spool emptied once stored
