"""A flaky or dead tracker (a real MLflow server, behind a fault-injecting proxy, killed and
restarted) never loses a checkpoint, never stalls the loop on the network, never stores one
twice and never changes the training result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ckpt_track as ct
from faults.common import LOOP_LIMIT, Loop, baseline, equal_weights, make, rng_state, scale, seed_all
from faults.proxy import FaultProxy, random_policy

pytestmark = pytest.mark.slow
RESULTS = Path(__file__).parents[1] / "artifacts" / "faults"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow_server import MlflowServer, free_port

    for var in [v for v in os.environ if v.startswith("MLFLOW_HTTP_REQUEST_")]:
        monkeypatch.delenv(var)  # ckpt_track's own client settings, as a user gets them
    srv = MlflowServer(tmp_path / "server", free_port()).start()
    yield srv
    srv.stop()


def _settings(uri: str, root: Path, **extra: object) -> dict[str, object]:
    return {"backend": "mlflow", "monitor": "val/loss", "mlflow": {"tracking_uri": uri},
            "local": {"root": str(root)}, **extra}


def _record(name: str, data: dict[str, object]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True))


def _check_stored(uri: str, run_ref: object, steps: list[int]) -> None:
    """Every step stored exactly once, each verifies and restores; nothing half-made is left."""
    from mlflow import MlflowClient

    settings = ct.load_settings({"mlflow": {"tracking_uri": uri}})
    listed = ct.list_checkpoints(run_ref, settings)
    assert sorted(s.step for s in listed) == sorted(steps), "lost or double-stored checkpoints"
    assert "latest" in max(listed, key=lambda s: s.step).aliases
    for s in listed:
        model, opt, sched = make()
        ct.restore(s.ref, model=model, optimizer=opt, scheduler=sched, rng=False, settings=settings)
    client = MlflowClient(uri)
    run_id = listed[0].run.run_id
    exp = client.get_run(run_id).info.experiment_id
    leftovers = [m for m in client.search_logged_models([exp], filter_string=f"source_run_id='{run_id}'")
                 if not str(m.status).endswith("READY")]
    assert not leftovers, f"half-created models left in the tracker: {[m.model_id for m in leftovers]}"


def test_injected_500s_resets_and_delays(server, tmp_path: Path) -> None:
    """500s before and after the server did the work, connection resets and 1.5 s delays: nothing
    is lost or stored twice, no call waits on the network, and a resume is bit-identical."""
    steps = scale(8, 120)
    rate = scale(1, 2) * 0.05  # of each fault kind (the long suite: twice as flaky)
    proxy = FaultProxy(server.port, random_policy(7, p500_before=rate, p500_after=rate, preset=rate / 2,
                                                  pdelay=rate / 2, delay=1.5)).start()
    try:
        seed_all()
        model, opt, sched = make()
        loop = Loop()
        run = ct.init(project="faults", name="flaky", settings=_settings(proxy.uri, tmp_path / "store"))
        loop.run(run, model, opt, sched, 0, steps, pause=0.1)
        for _ in range(100):  # let the faults hit the backlog's uploads too
            run.wait()
            if not run.uploads_pending:
                break
        proxy.policy = lambda method, path: None  # the tracker recovers; finish() delivers the rest
        run.finish()
    finally:
        proxy.stop()
    faults = {k: v for k, v in proxy.log.items() if k != "requests"}
    assert proxy.log["500-after"] and proxy.log["500-before"] and proxy.log["delay"], proxy.log
    assert equal_weights(model, baseline(steps))  # checkpointing changed nothing in training
    _check_stored(server.uri, run.ref, list(range(steps)))
    # resume in a fresh "process" and go on: identical to never stopping
    model2, opt2, sched2 = make()
    seed_all(99)
    again = ct.init(project="faults", name="flaky", settings=_settings(server.uri, tmp_path / "store"))
    start = again.resume(model=model2, optimizer=opt2, scheduler=sched2)
    assert start == steps
    Loop().run(again, model2, opt2, sched2, start, steps + 5, every=100)
    again.finish()
    assert equal_weights(model2, baseline(steps + 5))
    slowest = max(loop.stalls)
    _record("injected_faults", {"checkpoints": steps, "requests": proxy.log["requests"], "faults": faults,
                                "slowest_log_checkpoint_s": round(slowest, 4)})
    assert slowest < LOOP_LIMIT, f"log_checkpoint blocked {slowest:.2f} s: it waited on the tracker"


def test_background_uploads_leave_every_global_rng_untouched(server, tmp_path: Path) -> None:
    """Retries inside the tracker SDK (here: 500s on every other request) run in ckpt_track's
    upload thread; they must not draw from Python's, NumPy's or torch's global generators."""
    proxy = FaultProxy(server.port, random_policy(3, p500_before=0.15, p500_after=0.15)).start()
    try:
        seed_all()
        model, opt, sched = make()
        run = ct.init(project="faults", name="rng", settings=_settings(proxy.uri, tmp_path / "store"))
        before = rng_state()
        for step in range(6):
            run.log_checkpoint(step, model=model, optimizer=opt, scheduler=sched)
        run.wait()
        during = rng_state()
        proxy.policy = lambda method, path: None
        run.finish()
    finally:
        proxy.stop()
    assert proxy.log["500-before"] + proxy.log["500-after"] >= 3, proxy.log  # the SDK really retried
    changed = [name for name, a, b in zip(("python", "numpy", "torch"), before, during)
               if not (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)]
    assert not changed, f"a background upload consumed the global {changed} generator(s)"


def test_server_killed_and_restarted_during_training(server, tmp_path: Path) -> None:
    """SIGKILL the tracker (its whole process group) over and over while training checkpoints:
    the loop never notices, and once it is back every checkpoint lands once, in order."""
    kills = scale(2, 20)
    seed_all()
    model, opt, sched = make()
    run = ct.init(project="faults", name="killed", settings=_settings(server.uri, tmp_path / "store"))
    done = threading.Event()
    rng = __import__("random").Random(11)  # a private generator: the loop's own must stay untouched

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.3, 2.0))
                assert server.proc is not None
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=30)
                server.proc = None
                time.sleep(rng.uniform(0.0, 1.0))
                server.start()
        finally:
            done.set()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    loop = Loop()
    step = 0
    while not done.is_set() or step < 10:
        loop.run(run, model, opt, sched, step, step + 5, every=5, pause=0.05)
        step += 5
    thread.join()
    run.finish()
    assert equal_weights(model, baseline(step))
    _check_stored(server.uri, run.ref, list(range(0, step, 5)))
    _record("server_kills", {"server_kills": kills, "checkpoints": len(range(0, step, 5)),
                             "slowest_log_checkpoint_s": round(max(loop.stalls), 4)})
    assert max(loop.stalls) < LOOP_LIMIT


def test_init_with_the_tracker_down_starts_deferred_and_a_later_process_uploads(tmp_path: Path) -> None:
    """ct.init against a dead tracker starts at once with a provisional run; the process dies
    before the tracker is back; the next process (same run name) uploads what it spooled."""
    from mlflow_server import MlflowServer, free_port

    port = free_port()
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_TRACK_", "MLFLOW_HTTP_"))}
    code = (
        "import sys, time, torch, ckpt_track as ct\n"
        f"s = {_settings(f'http://127.0.0.1:{port}', store)!r}\n"
        "t0 = time.monotonic()\n"
        "run = ct.init(project='faults', name='deferred', settings=s)\n"
        "print('init', round(time.monotonic() - t0, 2), run.id, flush=True)\n"
        "m = torch.nn.Linear(4, 4)\n"
        "for step in range(3):\n"
        "    run.log_checkpoint(step, model=m, metrics={'val/loss': 1.0 / (step + 1)}).wait()\n"
        "import os; os._exit(0)\n"  # dies without finish(): nothing was uploaded
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    _, took, provisional = done.stdout.split()
    assert float(took) < 10 and provisional.startswith("deferred-"), done.stdout
    assert "provisional run" in done.stderr and "unreachable" in done.stderr
    server = MlflowServer(tmp_path / "server", port).start()
    try:
        run = ct.init(project="faults", name="deferred", settings=_settings(server.uri, store))
        assert not run.id.startswith("deferred-")
        assert run.resume(model=torch.nn.Linear(4, 4)) == 3  # what was spooled while the tracker was down
        run.finish()
        listed = ct.list_checkpoints(run.ref, ct.load_settings({"mlflow": {"tracking_uri": server.uri}}))
        assert [s.step for s in listed] == [0, 1, 2]
        assert not [p for p in (store / ".spool").iterdir()], "spool leftovers"
    finally:
        server.stop()
