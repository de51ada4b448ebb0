"""The ClearML SDK's own settings are honoured as defaults and ckpt_track's override them
(issue 15, bug 4's rule), and ``run.finish()`` does not hang without a config file (bug 5).

Each case runs in a fresh subprocess: the SDK reads ``CLEARML_OFFLINE_MODE`` and its config
once, at import.  Online cases talk to the loopback fake server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.clearml import CONFIG_FILE, FakeClearmlServer

import ckpt_track as ct

PROBE = """
import json, sys
import ckpt_track as ct
from clearml import Task
run = ct.init(project="settings", name="probe", backend="clearml", settings=json.loads(sys.argv[1]))
run.log_checkpoint(1, model=__import__("torch").nn.Linear(2, 2), metrics={"val/loss": 1.0}, blocking=True)
out = {"id": run.id, "offline": Task.is_offline(), "url": run._targets[0][1].native.url}
task = Task.current_task()
out["script"] = bool((task.export_task().get("script") or {}).get("entry_point")) if task else None
run.finish()
print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def server() -> Iterator[FakeClearmlServer]:
    srv = FakeClearmlServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _env(tmp: Path, server: FakeClearmlServer | None = None, config: Path | None = CONFIG_FILE,
         **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "CKPT_TRACK_"))}
    env.update({"HOME": str(tmp / "home"), "CLEARML_CACHE_DIR": str(tmp / "cache"),
                "PYTHONPATH": str(Path(ct.__file__).parents[1])})
    if config is not None:
        env["CLEARML_CONFIG_FILE"] = str(config)
    if server is not None:
        env.update({"CLEARML_API_HOST": server.api_host, "CLEARML_FILES_HOST": server.files_host,
                    "CLEARML_API_ACCESS_KEY": server.access_key, "CLEARML_API_SECRET_KEY": server.secret_key,
                    "CLEARML_WEB_HOST": "http://sdk-web.example:8080"})
    env.update(extra)
    return env


def _probe(tmp: Path, env: dict[str, str], settings: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "probe.py").write_text(PROBE)
    out = subprocess.run([sys.executable, "probe.py", json.dumps({"backend": "clearml", **settings})], cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])


# -- offline mode: CLEARML_OFFLINE_MODE, overridden by [clearml] offline -------------------------------------
def test_sdk_offline_mode_is_the_default(tmp_path: Path) -> None:
    got = _probe(tmp_path, _env(tmp_path, CLEARML_OFFLINE_MODE="1"), {})
    assert got["id"].startswith("offline-") and got["offline"]


def test_ckpt_track_offline_false_wins_over_the_sdk_offline_mode(tmp_path: Path, server: FakeClearmlServer) -> None:
    got = _probe(tmp_path, _env(tmp_path, server, CLEARML_OFFLINE_MODE="1"), {"clearml": {"offline": False}})
    assert not got["id"].startswith("offline-") and got["id"] in server.tasks


def test_ckpt_track_offline_true_wins_over_an_online_sdk(tmp_path: Path, server: FakeClearmlServer) -> None:
    got = _probe(tmp_path, _env(tmp_path, server), {"clearml": {"offline": True}})
    assert got["id"].startswith("offline-") and got["id"] not in server.tasks


# -- hosts and credentials: the SDK's; the web host ckpt_track links to can be overridden ---------------------
def test_sdk_hosts_and_credentials_are_used(tmp_path: Path, server: FakeClearmlServer) -> None:
    got = _probe(tmp_path, _env(tmp_path, server), {})
    assert got["id"] in server.tasks  # CLEARML_API_HOST + CLEARML_API_ACCESS_KEY / SECRET_KEY
    assert got["url"].startswith("http://sdk-web.example:8080/projects/")  # CLEARML_WEB_HOST
    uploaded = [k for k, _ in server.uploads if k.startswith("settings/")]
    assert uploaded  # CLEARML_FILES_HOST: the checkpoint went to the fake file server


def test_ckpt_track_web_host_wins_over_clearml_web_host(tmp_path: Path, server: FakeClearmlServer) -> None:
    got = _probe(tmp_path, _env(tmp_path, server), {"clearml": {"web_host": "https://ui.example.org/"}})
    assert got["url"].startswith("https://ui.example.org/projects/")


# -- run.finish() without a config file (bug 5) -----------------------------------------------------------
def _git_repo(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "train.py").write_text("print('hi')\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=where, check=True)
    subprocess.run([*git, "add", "."], cwd=where, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=where, check=True)
    (where / "train.py").write_text("print('dirty')\n")  # an uncommitted diff for the SDK to store
    return where


def test_finish_never_waits_on_repository_detection_without_a_config_file(tmp_path: Path) -> None:
    """No CLEARML_CONFIG_FILE, no ~/clearml.conf, in a git repository: the SDK's default would
    scan the repository in the background and close() waits up to 300 s for it.  ckpt_track's
    Task.init turns detection off, so no run records a repository and each finishes in time."""
    for i in range(3):
        repo = _git_repo(tmp_path / f"repo{i}")
        got = _probe(repo, _env(repo, config=None, CLEARML_OFFLINE_MODE="1"), {}, timeout=60)
        assert got["script"] is False, f"run {i}: the SDK detected the repository"


def test_a_user_config_of_repository_detection_is_honoured(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    conf = tmp_path / "clearml.conf"
    conf.write_text("sdk { development { vcs_repo_detect_async: false, store_uncommitted_code_diff: false } }\n")
    got = _probe(repo, _env(repo, config=conf, CLEARML_OFFLINE_MODE="1"), {}, timeout=60)
    assert got["script"] is True  # the user asked for (synchronous) detection: the SDK recorded the script
    got = _probe(repo, _env(repo, config=conf, CLEARML_OFFLINE_MODE="1"), {"clearml": {"detect_repository": False}},
                 timeout=60)
    assert got["script"] is False  # ckpt_track's setting wins
