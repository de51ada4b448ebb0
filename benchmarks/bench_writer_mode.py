"""Background writer: a thread or a separate process?  Measured on this machine.

    python benchmarks/bench_writer_mode.py [--mib 512] [--steps 40]

A CPU training loop runs while the background writes checkpoints of a staged state
back to back (serialize to safetensors, hash, fsync: what the writer does), in three
set-ups, each as interleaved repeats:

  none     no background work (the baseline step time)
  thread   the writer in a thread of the training process (ckpt_track's choice), at nice +10
  process  the writer in a separate process that reads the staging buffers from shared memory,
           at nice +10

Reported: median training-step slowdown against "none", and the writer's throughput while
the loop runs.  The heavy parts of a save (safetensors' Rust serializer, xxhash, file I/O)
release the GIL, so a thread does not hold up the training thread's Python; a process pays
for shared staging memory and IPC instead.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section
from safetensors.torch import save_file

from ckpt_track.format import content_digest, hash_file


def _nice() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _write_loop(tensors: dict[str, torch.Tensor], work: Path, stop, written) -> None:  # type: ignore[no-untyped-def]
    """The writer's work per tensor file (digest, serialize, fsync, hash), counted per file."""
    _nice()
    while not stop.is_set():
        for name in sorted(tensors):
            if stop.is_set():
                return
            digest = content_digest(tensors, [name])
            path = work / f"t-{digest}-{uuid.uuid4().hex[:6]}.safetensors"
            save_file({name: tensors[name]}, str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            hash_file(path)
            with written.get_lock():
                written.value += path.stat().st_size
            path.unlink()


def _process_main(tensors, work, stop, written) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    _write_loop(tensors, Path(work), stop, written)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-writer-mode-"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(512, 1024)
    n = args.mib * 2**20 // 4 // 16
    staged = {f"t{i}": torch.randn(n).share_memory_() for i in range(16)}  # staging, shared

    def steps() -> list[float]:
        out = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            out.append(time.perf_counter() - t0)
        return out

    ctx = mp.get_context("spawn")
    results: dict[str, list[float]] = {"none": [], "thread": [], "process": []}
    rates: dict[str, list[float]] = {"thread": [], "process": []}
    steps()  # warm up
    for _ in range(args.repeats):
        results["none"].append(statistics.median(steps()))
        for mode in ("thread", "process"):
            stop = ctx.Event()
            written = ctx.Value("q", 0)
            if mode == "thread":
                worker: threading.Thread | mp.process.BaseProcess = threading.Thread(
                    target=_write_loop, args=(staged, work, stop, written))
            else:
                worker = ctx.Process(target=_process_main, args=(staged, str(work), stop, written))
            worker.start()
            time.sleep(1.0)  # let the writer get going (and the process import torch)
            with written.get_lock():
                start_bytes = written.value
            t0 = time.perf_counter()
            results[mode].append(statistics.median(steps()))
            elapsed = time.perf_counter() - t0
            with written.get_lock():
                rates[mode].append((written.value - start_bytes) / elapsed / 1e9)
            stop.set()
            worker.join()
    shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(results["none"])
    rows = [f"| none | {base * 1e3:.1f} ms | - | - |"]
    for mode in ("thread", "process"):
        m = statistics.median(results[mode])
        rows.append(f"| {mode} | {m * 1e3:.1f} ms | {m / base - 1:+.1%} | {statistics.median(rates[mode]):.2f} GB/s |")
    body = f"""## Background writer: thread or process (`benchmarks/bench_writer_mode.py`)

{machine()}
- torch {torch.__version__} ({torch.get_num_threads()} intra-op threads); staged state {args.mib} MiB in 16
  tensors, written back to back (content-addressed safetensors files, xxh3, fsync) while a 6-layer MLP trains;
  {args.repeats} interleaved repeats of {args.steps} steps, medians. Both writers run at nice +10.

| writer | training step | slowdown | writer throughput during the loop |
|---|---:|---:|---:|
{chr(10).join(rows)}
"""
    write_section("bench_writer_mode", body)
    print(body)


if __name__ == "__main__":
    main()
