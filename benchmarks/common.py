"""Shared by the benchmarks: machine facts and the RESULTS.md section writer."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """Markdown bullet lines: date, platform, CPU, Python."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"- Date: {now}\n- Platform: {platform.platform()}\n"
            f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable by this process)\n"
            f"- Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def free_port() -> int:
    """A free TCP port on the loopback interface (the rendezvous of a benchmark's ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def count_thread_cpu(owner: object, name: str) -> list[float]:
    """Replace ``owner.name`` (a function of a module, or a method of a class) by a wrapper that
    appends the CPU seconds of the calling thread spent in each call to the returned list."""
    real = getattr(owner, name)
    spent: list[float] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        c0 = time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.thread_time() - c0)

    setattr(owner, name, counted)
    return spent
