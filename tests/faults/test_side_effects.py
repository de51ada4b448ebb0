"""No side effects nobody asked for: resolving a reference with nothing configured contacts no
vendor host and creates nothing in the working directory; it says which setting to set.

Each case runs in a fresh interpreter (SDKs cache their configuration at import) with an
environment free of tracker settings, a socket recorder that refuses every non-loopback
contact, and an empty working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a fresh interpreter

RUN = "3f" * 16
HEX = "0123456789abcdef" * 2

SCRIPT = textwrap.dedent("""
    import json, socket, sys
    contacts = []
    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo
    def _check(host):
        contacts.append(str(host))
        if str(host).strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            raise ConnectionRefusedError("test: refused " + str(host))
    def connect(sock, address):
        if isinstance(address, tuple):
            _check(address[0])
        return real_connect(sock, address)
    def getaddrinfo(host, *a, **k):
        _check(host)
        return real_gai(host, *a, **k)
    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo
    socket.create_connection.__globals__["getaddrinfo"] = getaddrinfo

    import ckpt_track as ct
    out = {"contacts": contacts}
    try:
        ct.restore(sys.argv[1], settings=ct.load_settings())
        out["error"] = None
    except Exception as exc:
        out["error"], out["message"] = type(exc).__name__, str(exc)
    print("RESULT " + json.dumps(out))
""")


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "CLEARML_", "TRAINS_", "WANDB_", "COMET_", "CKPT_TRACK_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return env


def _restore(tmp_path: Path, ref: str, **extra_env: str) -> tuple[dict, list[str]]:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**_clean_env(tmp_path), **extra_env}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ref], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line[len("RESULT "):]), sorted(p.name for p in cwd.iterdir())


@pytest.mark.parametrize("ref", [f"clearml://{HEX}", HEX, f"https://app.clear.ml/projects/*/experiments/{HEX}/output"])
def test_unconfigured_clearml_contacts_no_vendor_host(tmp_path: Path, ref: str) -> None:
    pytest.importorskip("clearml")
    conf = tmp_path / "clearml.conf"
    conf.write_text("")  # nothing configured, also not in ~/clearml.conf
    out, created = _restore(tmp_path, ref, CLEARML_CONFIG_FILE=str(conf))
    assert out["error"] == "ConfigError", out
    assert "CLEARML_API_HOST" in out["message"] and "clearml.conf" in out["message"]
    assert out["contacts"] == [], f"contacted {out['contacts']} before saying what to configure"
    assert created == []


@pytest.mark.parametrize("ref", [f"mlflow://{RUN}@latest", f"runs:/{RUN}/best", f"mlflow://models/m-{HEX}",
                                 "models:/resnet/3"])
def test_unconfigured_mlflow_creates_no_store_in_cwd(tmp_path: Path, ref: str) -> None:
    pytest.importorskip("mlflow")
    out, created = _restore(tmp_path, ref)
    assert out["error"] == "ConfigError", out
    assert "MLFLOW_TRACKING_URI" in out["message"] and "[mlflow] tracking_uri" in out["message"]
    assert created == [], f"resolving {ref} created {created} in the working directory"
    assert out["contacts"] == []


def test_mlflow_ui_url_is_enough_configuration(tmp_path: Path) -> None:
    """A pasted UI URL names the server: it is used (and only it), nothing is written locally."""
    pytest.importorskip("mlflow")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, created = _restore(tmp_path, f"http://127.0.0.1:{port}/#/experiments/1/runs/{RUN}",
                            CKPT_TRACK_TIMEOUT="2", CKPT_TRACK_RETRIES="0")
    assert out["error"] == "BackendUnavailable", out
    assert f"127.0.0.1:{port}" in out["message"]
    assert set(out["contacts"]) <= {"127.0.0.1"}
    assert created == []
