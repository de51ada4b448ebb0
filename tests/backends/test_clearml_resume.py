"""ClearML offline: a script killed mid-run and started again with the same name resumes at
the right step (issue 15, bug 3).

Real crash: the training script runs in a subprocess that SIGKILLs itself after its third
checkpoint; the restart runs the same script.  Both write real offline sessions with the
real SDK, which the test reads back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from fakes.clearml import CONFIG_FILE, OfflineSession

import ckpt_track as ct
from ckpt_track.backends.clearml import ClearmlBackend

SCRIPT = """
import os, signal, sys
import torch
import ckpt_track as ct

kill_at = int(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
run = ct.init(project="crash", name=sys.argv[2], backend="clearml", monitor="val/loss",
              settings={"clearml": {"offline": True}})
start = run.resume(model=model)
print("START", start, run.id, flush=True)
for step in range(start, 10):
    with torch.no_grad():
        model.weight.add_(float(step))
    if step % 3 == 0:
        run.log_checkpoint(step, model=model, metrics={"val/loss": 1.0 / (step + 1)}, blocking=True)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no finish(), no session zip
run.finish()
torch.save(model.state_dict(), "final.pt")
print("DONE", flush=True)
"""


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "CKPT_TRACK_"))}
    env.update({"HOME": str(tmp / "home"), "CLEARML_CACHE_DIR": str(tmp / "cache"),
                "CLEARML_CONFIG_FILE": str(CONFIG_FILE), "PYTHONPATH": str(Path(ct.__file__).parents[1])})
    return env


def _train(tmp: Path, kill_at: int, name: str = "crashy") -> subprocess.CompletedProcess[str]:
    (tmp / "train.py").write_text(SCRIPT)
    return subprocess.run([sys.executable, "train.py", str(kill_at), name], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=240, check=False)


def _started(out: str) -> tuple[int, str]:
    line = next(x for x in out.splitlines() if x.startswith("START"))
    _, start, run_id = line.split()
    return int(start), run_id


def test_offline_restart_with_the_same_name_resumes_at_the_right_step(tmp_path: Path) -> None:
    crashed = _train(tmp_path, kill_at=7)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    start, first = _started(crashed.stdout)
    assert start == 0
    offline = tmp_path / "cache" / "offline"
    assert (offline / first / "task.json").is_file() and not (offline / f"{first}.zip").exists()  # never closed

    restarted = _train(tmp_path, kill_at=-1)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    start, second = _started(restarted.stdout)
    assert start == 7 and second != first  # the newest checkpoint was step 6

    # the new session holds the checkpoint it resumed from (manifest byte for byte) and its own
    session = OfflineSession(offline / f"{second}.zip")
    props = session.user_properties()
    assert props["ckpt_track_continues"] == first
    metas = [session.artifact_metadata(k) for k in sorted(session.artifacts) if k.startswith("ckpt-v")]
    assert [(m["version"], m["step"]) for m in metas] == [("1", "6"), ("2", "9")]
    assert json.loads(props["ckpt_track_aliases"])["latest"] == 2
    assert props["ckpt_track_resumed_from"] == f"clearml://{second}:v1"
    crashed_doc = json.loads((offline / first / "task.json").read_text())
    uri = next(a["uri"] for a in crashed_doc["execution"]["artifacts"] if a["key"] == "ckpt-v000003")
    with zipfile.ZipFile(uri) as zf:  # the crashed session's step-6 checkpoint, as the SDK stored it
        assert session.artifact_files("ckpt-v000001")["manifest.json"] == zf.read("manifest.json")
    # the training ends where an uninterrupted run ends
    full = tmp_path / "full"
    full.mkdir()
    assert _train(full, kill_at=-1, name="uninterrupted").returncode == 0
    a, b = torch.load(tmp_path / "final.pt"), torch.load(full / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the session alone lists both steps
    reader = ClearmlBackend({"offline_dir": str(offline)})
    assert [s.step for s in reader.list(reader.find_run(ct.Ref("clearml", second)))] == [6, 9]
