"""What many tests share: small seeded models, the CLI's error contract, the environment of a
subprocess that logs to every tracker offline, stopping a server's process group, and damaging
a committed (read-only) checkpoint file."""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
from typer.testing import Result

__all__ = ["assert_cli_error", "mlp", "offline_trackers_env", "overwrite", "stop_process_group", "writable"]


def mlp(sizes: Sequence[int], seed: int = 0, *, norm: bool = False) -> torch.nn.Sequential:
    """``Linear`` layers through ``sizes`` (a BatchNorm after the first with ``norm``: a buffer
    that changes in forward), seeded so that the same call builds the same weights."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if norm and i == 0:
            layers.append(torch.nn.BatchNorm1d(b))
    return torch.nn.Sequential(*layers)


def assert_cli_error(result: Result, code: int) -> str:
    """The CLI's error contract: exit ``code``, ``error: ...`` first on stderr, only indented
    lines after it, nothing on stdout, no traceback.  Returns stderr."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert all(line.startswith("  ") for line in lines[1:]), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    return result.stderr


def offline_trackers_env(work: Path, mlflow_uri: str, clearml_config: Path,
                         drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a subprocess that can log to any of the five backends with only
    ``CKPT_TRACK_BACKEND`` changed: the local store and the SDKs' homes under ``work``, MLflow at
    ``mlflow_uri``, the other SDKs offline and quiet.  Variables of those tools (and ``drop``
    prefixes) from outside are left out."""
    # TRAINS_*: ClearML's Task.init sets TRAINS_PROC_MASTER_ID; a child inheriting it gets a stub task
    foreign = ("CKPT_TRACK_", "WANDB_", "COMET_", "CLEARML_", "TRAINS_", *drop)
    env = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
    env.update({
        "CKPT_TRACK_LOCAL__ROOT": str(work / "store"),
        "CKPT_TRACK_MLFLOW__TRACKING_URI": mlflow_uri,
        "CKPT_TRACK_WANDB__MODE": "offline", "CKPT_TRACK_WANDB__DIR": str(work / "wb"),
        "CKPT_TRACK_CLEARML__OFFLINE": "true",
        "CKPT_TRACK_COMET__ONLINE": "false", "CKPT_TRACK_COMET__WORKSPACE": "ws",
        "CKPT_TRACK_COMET__OFFLINE_DIRECTORY": str(work / "comet"),
        # the SDKs' own homes and quiet settings, all inside the test's folder
        "HOME": str(work / "home"), "WANDB_DIR": str(work / "wb"), "WANDB_DATA_DIR": str(work / "wbdata"),
        "WANDB_CACHE_DIR": str(work / "wbcache"), "WANDB_CONFIG_DIR": str(work / "wbconfig"),
        "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true",
        "CLEARML_CONFIG_FILE": str(clearml_config), "CLEARML_CACHE_DIR": str(work / "clearml-cache"),
        "COMET_ERROR_TRACKING_ENABLE": "false", "COMET_DISABLE_AUTO_LOGGING": "1",
        "COMET_AUTO_LOG_ENV_DETAILS": "false", "COMET_AUTO_LOG_GIT_METADATA": "false",
        "COMET_AUTO_LOG_GIT_PATCH": "false", "COMET_AUTO_LOG_CODE": "false", "COMET_DISPLAY_SUMMARY_LEVEL": "0",
        "COMET_CONFIG": str(work / "no.comet.config"),
    })
    return env


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM to its whole group (its
    workers too), SIGKILL after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def writable(path: Path) -> Path:
    """Give a committed checkpoint file (sealed read-only: ``ckpt_track.format.modes``) its
    owner's write bit back, so that a test can damage it in place as a tool or a disk error
    might; without it only root could.  Returns ``path``."""
    os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    return path


def overwrite(path: Path, data: bytes) -> None:
    """Overwrite a committed (read-only) checkpoint file with ``data``."""
    writable(path).write_bytes(data)
