"""Compare checkpoint-hashing throughput: xxh3_128, blake3 (1 and all threads), sha256.

Usage: python benchmarks/bench_hash.py [--mb 512]

Results go into the bench_hash section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import os
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import blake3
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_section  # noqa: E402

REPEATS = 5

HASHERS: dict[str, Callable[[memoryview], bytes]] = {
    "xxh3_128": lambda b: xxhash.xxh3_128(b).digest(),
    "blake3 (1 thread)": lambda b: blake3.blake3(b).digest(),
    "blake3 (AUTO threads)": lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
}


def measure(buf: memoryview) -> dict[str, float]:
    """Median GB/s per hasher; rounds are interleaved so drift hits all hashers alike."""
    times: dict[str, list[float]] = {name: [] for name in HASHERS}
    for _ in range(REPEATS):
        for name, fn in HASHERS.items():
            t0 = time.perf_counter()
            fn(buf)
            times[name].append(time.perf_counter() - t0)
    return {name: len(buf) / statistics.median(ts) / 1e9 for name, ts in times.items()}


def render(gbps: dict[str, float], size: int) -> str:
    base = gbps["xxh3_128"]
    rows = "\n".join(f"| {n} | {v:.2f} | {v / base:.2f} |" for n, v in gbps.items())
    fastest = max(gbps, key=gbps.__getitem__)
    b1, bn, sha = gbps["blake3 (1 thread)"], gbps["blake3 (AUTO threads)"], gbps["sha256"]
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    conclusion = (
        f"{fastest} is the fastest here ({gbps[fastest]:.2f} GB/s): xxh3_128 gives "
        f"{base / b1:.1f}x the throughput of single-threaded blake3, {base / bn:.1f}x that of "
        f"blake3 on {usable} threads and {base / sha:.1f}x that of sha256."
    )
    return f"""## Hash throughput (`benchmarks/bench_hash.py`)

{machine()}
- xxhash {version("xxhash")}, blake3 {version("blake3")}
- Buffer: {size / 2**20:.0f} MiB of random bytes, {REPEATS} interleaved repeats, median shown

| Hash | GB/s (median) | vs xxh3_128 |
|---|---:|---:|
{rows}

{conclusion}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="buffer size in MiB (default 512)")
    args = parser.parse_args()
    size = args.mb * 2**20
    buf = memoryview(os.urandom(size))
    gbps = measure(buf)
    for name, value in gbps.items():
        print(f"{name:24s} {value:7.2f} GB/s  {value / gbps['xxh3_128']:.2f}x xxh3_128")
    write_section("bench_hash", render(gbps, size))
    print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
