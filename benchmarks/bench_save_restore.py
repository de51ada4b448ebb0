"""Save pause, save throughput, verified restore and memory: ckpt_track against baselines,
measured in the same process as interleaved A/B pairs (medians, ratios).

    python benchmarks/bench_save_restore.py [--gib 1.0] [--pairs 5] [--skip-loop]

Goals (issue "Speed"), all ratios:
  P1 loop pause per checkpoint <= 3% of torch.save + fsync + mlflow.log_artifact, and <= 1.5x a plain
     copy of the state into preallocated buffers
  P3 save throughput >= 0.9x raw write + fsync of the same bytes
  P4 verified restore >= 2x faster than torch.load(weights_only=True) + load_state_dict, and >= 0.8x a
     raw readinto of the same bytes
  P6 extra peak memory <= 1.1x state during an async save, <= 0.1x state during restore
  P7 end-to-end slowdown of a CPU loop checkpointing every ~6 s of compute <= 3%
Results go into the bench_save_restore section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

import ckpt_track as ct  # noqa: E402


def make_model(gib: float) -> torch.nn.Module:
    width = 4096
    layers = max(1, round(gib * 2**30 / (width * width * 4)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


_touches = iter(range(1, 10**9))


def touch(model: torch.nn.Module) -> None:
    """Give one element of every tensor a value it never had before, so every file of the
    next checkpoint is new (restores in between set the weights back to earlier states)."""
    n = float(next(_touches)) * 1000.0
    with torch.no_grad():
        for v in model.state_dict().values():
            v.view(-1)[0] = n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--skip-loop", action="store_true", help="skip P7 (the end-to-end loop, ~1 minute)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    os.chdir(work)
    os.environ["CKPT_TRACK_LOCAL__ROOT"] = str(work / "store")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=str(work / "mlruns"))
    model = make_model(args.gib)
    size = nbytes(model)
    print(f"state: {size / 2**30:.2f} GiB in {len(model.state_dict())} tensors; work dir {work}")
    res: dict[str, list[float]] = {k: [] for k in (
        "baseline_save", "plain_copy", "ct_pause", "ct_total", "raw_write", "ct_blocking",
        "torch_load", "ct_restore", "raw_read")}
    buffers = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    run = ct.init(project="bench", name="bench")
    mem: dict[str, float] = {}
    for i in range(args.pairs):
        # P1 baseline: torch.save + fsync + mlflow.log_artifact
        def baseline() -> None:
            path = work / f"base-{i}.pt"
            torch.save(model.state_dict(), path)
            fsync_path(path)
            with mlflow.start_run(experiment_id=exp):
                mlflow.log_artifact(str(path))
            path.unlink()
        res["baseline_save"].append(timed(baseline))
        res["plain_copy"].append(timed(lambda: [buffers[k].copy_(v) for k, v in model.state_dict().items()]))
        # every tensor changes between checkpoints, as in full training (incremental saves
        # would otherwise skip unchanged files; P5 measures that separately)
        touch(model)
        # P1 ckpt_track: the pause is the time log_checkpoint blocks the loop
        reset_peak()
        base_rss = rss()
        t0 = time.perf_counter()
        handle = run.log_checkpoint(i, model=model)
        res["ct_pause"].append(time.perf_counter() - t0)
        handle.wait()
        res["ct_total"].append(time.perf_counter() - t0)
        if i == 0:  # the first save allocates the staging buffers that later saves reuse
            mem["save_extra"] = (peak() - base_rss) / size
        # P3: raw write + fsync of the same bytes vs a blocking ckpt_track save
        def raw_write() -> None:
            # a new file each pair, like a checkpoint (rewriting one path reuses its disk blocks,
            # which on this VM disk is several times faster than writing fresh ones)
            path = work / f"raw-{i}.bin"
            with open(path, "wb") as f:
                for v in model.state_dict().values():
                    f.write(memoryview(v.numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        touch(model)
        p3 = [("raw_write", raw_write), ("ct_blocking", lambda: run.log_checkpoint(1000 + i, model=model, blocking=True))]
        for key, fn in (p3 if i % 2 == 0 else p3[::-1]):  # alternate the order: a write slows the next one
            res[key].append(timed(fn))
        # P4: restore
        torch.save(model.state_dict(), work / "restore.pt")
        target = model
        res["torch_load"].append(timed(lambda: target.load_state_dict(torch.load(work / "restore.pt", weights_only=True))))
        (work / "restore.pt").unlink()
        reset_peak()
        base_rss = rss()
        res["ct_restore"].append(timed(lambda: ct.restore(f"{run.ref}@step={1000 + i}", model=target)))
        if i == args.pairs - 1:
            mem["restore_extra"] = (peak() - base_rss) / size
        def raw_read() -> None:
            with open(work / f"raw-{i}.bin", "rb") as f:
                for v in target.state_dict().values():
                    f.readinto(memoryview(v.numpy()).cast("B"))
        res["raw_read"].append(timed(raw_read))
        (work / f"raw-{i}.bin").unlink()
        # keep the store from filling the disk
        for s in ct.list_checkpoints(run.ref)[:-1]:
            shutil.rmtree(s.native["path"], ignore_errors=True)
        print(f"pair {i + 1}/{args.pairs} done")
    run.finish()
    med = {k: statistics.median(v) for k, v in res.items()}

    loop = None if args.skip_loop else e2e_loop(work)
    shutil.rmtree(work, ignore_errors=True)
    gb = size / 1e9
    rows = [
        ("P1 loop pause / (torch.save + fsync + mlflow.log_artifact)", med["ct_pause"] / med["baseline_save"], "<= 0.03"),
        ("P1 loop pause / plain copy into preallocated buffers", med["ct_pause"] / med["plain_copy"], "<= 1.5"),
        ("P3 save throughput / raw write + fsync", med["raw_write"] / med["ct_blocking"], ">= 0.9"),
        ("P4 restore speed / (torch.load + load_state_dict)", med["torch_load"] / med["ct_restore"], ">= 2"),
        ("P4 restore speed / raw readinto", med["raw_read"] / med["ct_restore"], ">= 0.8"),
        ("P6 extra peak RSS during the first async save (staging allocated) / state", mem["save_extra"], "<= 1.1"),
        ("P6 extra peak RSS during restore / state", mem["restore_extra"], "<= 0.1"),
    ]
    if loop is not None:
        rows.append(("P7 end-to-end slowdown (checkpoint every ~6 s of compute)", loop, "<= 0.03"))
    table = "\n".join(f"| {name} | {value:.3f} | {goal} | {'met' if _met(value, goal) else 'missed'} |"
                      for name, value, goal in rows)
    times = "\n".join(f"| {k} | {v:.3f} s | {gb / v:.2f} GB/s |" for k, v in med.items())
    body = f"""## Save and restore (`benchmarks/bench_save_restore.py`)

{machine()}
- torch {torch.__version__}, mlflow {mlflow.__version__}, ckpt_track {ct.__version__}, backend local
- State: {size / 2**30:.2f} GiB of fp32 weights; {args.pairs} interleaved A/B pairs, medians

| goal | ratio | target | |
|---|---:|---|---|
{table}

| measurement (median) | time | throughput |
|---|---:|---:|
{times}
"""
    write_section("bench_save_restore", body)
    print(body)


def _met(value: float, goal: str) -> bool:
    op, num = goal.split()
    return value <= float(num) if op == "<=" else value >= float(num)


def e2e_loop(work: Path, pairs: int = 2) -> float:
    """Slowdown of a CPU training loop that checkpoints every ~6 s of compute."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])  # ~134 MB
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 2048)

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    per_step = statistics.median(timed(step) for _ in range(3))
    every = max(1, round(6.0 / per_step))
    steps = every * 4 + every // 2  # the last save has half an interval to land before finish()

    def loop(checkpoint: bool) -> float:
        run = ct.init(project="bench-loop", monitor=None) if checkpoint else None
        t0 = time.perf_counter()  # the one-time init is not part of the loop
        for i in range(1, steps + 1):
            step()
            if run is not None and i % every == 0:
                run.log_checkpoint(i, model=model, optimizer=opt)
        if run is not None:
            run.finish()
        return time.perf_counter() - t0

    ratios = []
    for _ in range(pairs):
        plain, with_ckpt = loop(False), loop(True)
        ratios.append(with_ckpt / plain - 1.0)
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
