"""What many tests share: small seeded models and the CLI's error contract."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from typer.testing import Result

__all__ = ["assert_cli_error", "mlp"]


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
