"""Provenance capture: where a checkpoint came from (code, config, environment).

What is captured here goes into each manifest's ``lineage`` next to the run, parent and
resumed-from edges; walking those edges into a tree is :mod:`ckpt_track.ops.lineage`."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["config_hash", "environment", "git_info", "to_jsonable"]


def to_jsonable(config: Any) -> dict[str, Any]:
    """A training config (dict, dataclass, argparse.Namespace, ...) as plain JSON values."""
    if config is None:
        return {}
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        config = asdict(config)
    elif not isinstance(config, Mapping) and hasattr(config, "__dict__"):
        config = vars(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, dataclass or namespace, not {type(config).__qualname__}")
    # lenient on purpose: the config is metadata, an odd value must not stop training
    return json.loads(json.dumps(dict(config), default=str, sort_keys=True))


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@lru_cache(maxsize=8)
def git_info(cwd: str | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the repository around ``cwd``; None outside one."""
    where = cwd or str(Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    import torch

    return {
        "host": socket.gethostname(),
        "versions": {
            "ckpt_track": _version("ckpt-track"),
            "torch": torch.__version__,
            "safetensors": _version("safetensors"),
            "python": platform.python_version(),
        },
    }
