"""Start the ranks of a multi-rank test as separate processes (what torchrun does): each gets
RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT, so one rank can be SIGKILLed alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_server import free_port

__all__ = ["Ranks", "free_port", "run", "start"]

WORKER = Path(__file__).with_name("worker.py")


@dataclass
class Ranks:
    procs: list[subprocess.Popen[str]]

    def wait(self, timeout: float = 120) -> list[tuple[int, str]]:
        """(return code, stderr) of every rank."""
        out = []
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            out.append((p.returncode, err))
        return out


def start(world: int, args: dict[str, Any], cwd: Path, env: dict[str, str] | None = None,
          rank_env: dict[int, dict[str, str]] | None = None) -> Ranks:
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = {**os.environ, **(env or {}), **(rank_env or {}).get(rank, {}), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        if world == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                e.pop(k)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], cwd=cwd, env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return Ranks(procs)


def run(world: int, args: dict[str, Any], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120, ok: bool = True, rank_env: dict[int, dict[str, str]] | None = None
        ) -> list[tuple[int, str]]:
    results = start(world, args, cwd, env, rank_env).wait(timeout)
    if ok:
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
    return results
