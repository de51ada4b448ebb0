"""Save pause, save throughput, writer CPU, verified restore and memory: ckpt_track against
baselines, measured in the same process as interleaved A/B pairs (medians, ratios).

    python benchmarks/bench_save_restore.py [--gib 1.0] [--pairs 5] [--skip-loop]

The state is what a real checkpoint holds: model weights plus AdamW state (two tensors per
weight), about ``--gib`` GiB in all.  Goals (issue "Speed close to the limit"), all ratios:
  P1 loop pause per checkpoint <= 0.03x torch.save + fsync + mlflow.log_artifact of the same state, and
     <= 0.25x a plain copy of the state into preallocated buffers (overlap on: what the optimizer owns
     is copied while the next step computes; the pause with overlap=False is reported too)
  P3 blocking save throughput >= 0.9x raw write + fsync of the same bytes (alternating order)
  P4 verified restore >= 0.8x a raw readinto of the same bytes, and >= 10x torch.load(weights_only=True)
     + load_state_dict
  P6 extra peak memory <= 1.1x state during an async save, <= 0.1x state during restore
  P7 slowdown of a CPU loop checkpointing a ~400 MB model + AdamW state every ~6 s of compute <= 1.0x the
     slowdown a plain background write + fsync of the same bytes at the same cadence causes (same run),
     and <= 3% where the machine has cores to spare
  Writer CPU <= 0.3 CPU-seconds per GiB (hash + write + fsync, the writer thread of a background save), next to the
     design it replaced (safetensors save_file, then hashing the file back) in the same run
Results go into the bench_save_restore section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_thread_cpu, machine, write_section

import ckpt_track as ct


def make_model(gib: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Weights and AdamW state of about ``gib`` GiB in all (a third of it weights)."""
    width = 4096
    layers = max(1, math.ceil(gib * 2**30 / (3 * width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).square().mean().backward()
    opt.step()  # the AdamW state exists
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a checkpoint of (model, opt) holds."""
    out = list(model.state_dict().values())
    for st in opt.state.values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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


def touch(tensors: list[torch.Tensor]) -> None:
    """Give one element of every tensor a value it never had before, so every file of the
    next checkpoint is new (restores in between set the weights back to earlier states)."""
    n = float(next(_touches)) * 1000.0
    with torch.no_grad():
        for v in tensors:
            if v.dim() > 0:
                v.view(-1)[0] = n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def old_design_write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The writer this one replaced, for the CPU comparison: content digest, safetensors'
    save_file (which copies every tensor into a new buffer), fsync, then the file hashed back."""
    from safetensors.torch import save_file

    from ckpt_track.format.hashing import content_digest, hash_file

    content_digest(tensors, sorted(tensors))
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)
    hash_file(path)


def warm(path: Path) -> None:
    """Read every file under ``path`` once (into the page cache)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(8 << 20):
                    pass


_writer_cpu: list[float] = []  # CPU seconds of the thread writing each checkpoint (see count_writer_cpu)


def count_writer_cpu() -> None:
    """Record the CPU seconds of the thread that writes each checkpoint (hash + write + fsync
    of every file, state.json and the manifest), around ckpt_track's own write function."""
    import ckpt_track.checkpointing as checkpointing

    global _writer_cpu
    _writer_cpu = count_thread_cpu(checkpointing, "write_checkpoint")


def cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of ``fn()``."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="model weights + AdamW state, GiB (default 1)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--skip-loop", action="store_true", help="skip P7 (the end-to-end loops, ~3 minutes)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    os.chdir(work)
    os.environ["CKPT_TRACK_LOCAL__ROOT"] = str(work / "store")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=str(work / "mlruns"))
    model, opt = make_model(args.gib)
    live = state_tensors(model, opt)
    size = nbytes(live)
    print(f"state: {size / 2**30:.2f} GiB (weights + AdamW) in {len(live)} tensors; work dir {work}")
    res: dict[str, list[float]] = {k: [] for k in (
        "baseline_save", "plain_copy", "ct_pause", "ct_pause_no_overlap", "ct_total", "raw_write", "ct_blocking",
        "torch_load", "ct_restore", "raw_read")}
    cpu: dict[str, list[float]] = {"writer": [], "ct_blocking": [], "old_design": []}
    count_writer_cpu()
    buffers = [v.clone() for v in live]
    run = ct.init(project="bench", name="bench", monitor=None)
    mem: dict[str, float] = {}

    def full_state() -> dict[str, object]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    for i in range(args.pairs):
        # P1 baseline: torch.save + fsync + mlflow.log_artifact of model + optimizer
        def baseline() -> None:
            path = work / f"base-{i}.pt"
            torch.save(full_state(), path)
            fsync_path(path)
            with mlflow.start_run(experiment_id=exp):
                mlflow.log_artifact(str(path))
            path.unlink()
        res["baseline_save"].append(timed(baseline))
        res["plain_copy"].append(timed(lambda: [b.copy_(v) for b, v in zip(buffers, live)]))
        # every tensor changes between checkpoints, as in full training (incremental saves
        # would otherwise skip unchanged files; P5 measures that separately)
        for key, overlap in (("ct_pause", True), ("ct_pause_no_overlap", False))[:: 1 if i % 2 == 0 else -1]:
            touch(live)
            reset_peak()
            base_rss = rss()
            t0 = time.perf_counter()
            handle = run.log_checkpoint(10 * i + overlap, model=model, optimizer=opt, overlap=overlap)
            res[key].append(time.perf_counter() - t0)
            handle.wait()
            cpu["writer"].append(_writer_cpu[-1])
            if key == "ct_pause":
                res["ct_total"].append(time.perf_counter() - t0)
            if "save_extra" not in mem:  # the first save allocates the staging buffers that later saves reuse
                mem["save_extra"] = (peak() - base_rss) / size

        # P3: raw write + fsync of the same bytes vs a blocking ckpt_track save; writer CPU
        def raw_write() -> None:
            # a new file each pair, like a checkpoint (rewriting one path reuses its disk blocks,
            # which on this VM disk is several times faster than writing fresh ones)
            path = work / f"raw-{i}.bin"
            with open(path, "wb") as f:
                f.writelines(memoryview(v.numpy()).cast("B") for v in live)
                f.flush()
                os.fsync(f.fileno())

        def blocking() -> None:
            wall, spent = cpu_timed(lambda: run.log_checkpoint(1000 + i, model=model, optimizer=opt, blocking=True))
            res["ct_blocking"].append(wall)
            cpu["ct_blocking"].append(spent)

        def old_design() -> None:
            named = {f"t{j}": b for j, b in enumerate(buffers)}
            cpu["old_design"].append(cpu_timed(lambda: old_design_write(work / f"old-{i}.safetensors", named))[1])
            (work / f"old-{i}.safetensors").unlink()

        touch(live)
        p3 = [("raw_write", lambda: res["raw_write"].append(timed(raw_write))), ("ct_blocking", blocking),
              ("old", old_design)]
        for _, fn in (p3 if i % 2 == 0 else p3[::-1]):  # alternate the order: a write slows the next one
            fn()
        # P4: restore model + optimizer
        torch.save(full_state(), work / "restore.pt")

        def torch_load() -> None:
            loaded = torch.load(work / "restore.pt", weights_only=True)
            model.load_state_dict(loaded["model"])
            opt.load_state_dict(loaded["optimizer"])
        res["torch_load"].append(timed(torch_load))
        (work / "restore.pt").unlink()
        live = state_tensors(model, opt)  # load_state_dict gave the optimizer new state tensors
        buffers = [v.clone() for v in live]  # preallocated and touched: the plain copy meets no page fault
        # both restores read page-cache-hot bytes: the raw file was written through the page
        # cache, ckpt_track's files with direct I/O (not cached), so read those once first
        warm(Path([c for c in ct.list_checkpoints(run.ref) if c.step == 1000 + i][0].native.path))
        reset_peak()
        base_rss = rss()
        res["ct_restore"].append(timed(lambda: ct.restore(f"{run.ref}@step={1000 + i}", model=model, optimizer=opt)))
        if i == args.pairs - 1:
            mem["restore_extra"] = (peak() - base_rss) / size

        def raw_read() -> None:
            with open(work / f"raw-{i}.bin", "rb") as f:
                for v in live:
                    f.readinto(memoryview(v.numpy()).cast("B"))
        res["raw_read"].append(timed(raw_read))
        (work / f"raw-{i}.bin").unlink()
        # keep the store from filling the disk
        for s in ct.list_checkpoints(run.ref)[:-1]:
            shutil.rmtree(s.native.path, ignore_errors=True)
        print(f"pair {i + 1}/{args.pairs} done")
    run.finish()
    med = {k: statistics.median(v) for k, v in res.items()}
    cpu_med = {k: statistics.median(v) / (size / 2**30) for k, v in cpu.items()}

    loop = None if args.skip_loop else e2e_loop(work)
    shutil.rmtree(work, ignore_errors=True)
    gb = size / 1e9
    rows = [
        ("P1 loop pause / (torch.save + fsync + mlflow.log_artifact)", med["ct_pause"] / med["baseline_save"], "<= 0.03"),
        ("P1 loop pause / plain copy into preallocated buffers", med["ct_pause"] / med["plain_copy"], "<= 0.25"),
        ("P1 loop pause with overlap=False / plain copy", med["ct_pause_no_overlap"] / med["plain_copy"], "(reference)"),
        ("P3 save throughput / raw write + fsync", med["raw_write"] / med["ct_blocking"], ">= 0.9"),
        ("P4 restore speed / (torch.load + load_state_dict)", med["torch_load"] / med["ct_restore"], ">= 10"),
        ("P4 restore speed / raw readinto", med["raw_read"] / med["ct_restore"], ">= 0.8"),
        ("P6 extra peak RSS during the first async save (staging allocated) / state", mem["save_extra"], "<= 1.1"),
        ("P6 extra peak RSS during restore / state", mem["restore_extra"], "<= 0.1"),
        ("Writer CPU-seconds per GiB (background save: hash + write + fsync, writer thread)", cpu_med["writer"],
         "<= 0.3"),
        ("CPU-seconds per GiB of a blocking save (the calling thread: capture, hash, write)", cpu_med["ct_blocking"],
         "(reference)"),
        ("Writer CPU-seconds per GiB of the replaced design (save_file, hash back)", cpu_med["old_design"],
         "(reference)"),
    ]
    notes = ""
    if loop is not None:
        rows += [
            ("P7 slowdown, ckpt_track / slowdown, plain background write + fsync", loop["ratio"], "<= 1.0"),
            ("P7 slowdown of the loop with ckpt_track", loop["ct"], f"<= 0.03 ({os.cpu_count()} cores)"),
        ]
        notes = (f"\nP7 loop: {loop['state_mb']:.0f} MB model + AdamW state, a checkpoint every {loop['every']} steps "
                 f"(~{loop['interval']:.1f} s of compute), {loop['pairs']} interleaved triples; slowdown vs the same "
                 f"loop without checkpoints: ckpt_track {loop['ct']:+.3f}, ckpt_track with overlap=False "
                 f"{loop['ct_no_overlap']:+.3f}, plain background write + fsync {loop['plain_write']:+.3f} "
                 f"(medians). ckpt_track's writer thread used {loop['writer_share']:.1%} of one core over the "
                 f"loop (hash + write + fsync).\n")
    table = "\n".join(f"| {name} | {value:.3f} | {goal} | {_verdict(value, goal)} |" for name, value, goal in rows)
    times = "\n".join(f"| {k} | {v:.3f} s | {gb / v:.2f} GB/s |" for k, v in med.items())
    body = f"""## Save and restore (`benchmarks/bench_save_restore.py`)

{machine()}
- torch {torch.__version__}, mlflow {mlflow.__version__}, ckpt_track {ct.__version__}, backend local
- State: {size / 2**30:.2f} GiB (model weights + AdamW state, {len(live)} tensors); {args.pairs} interleaved A/B
  pairs, medians

| goal | ratio | target | |
|---|---:|---|---|
{table}
{notes}
| measurement (median) | time | throughput |
|---|---:|---:|
{times}
"""
    write_section("bench_save_restore", body)
    print(body)


def _verdict(value: float, goal: str) -> str:
    if goal.startswith("("):
        return ""
    op, num = goal.split()[:2]
    ok = value <= float(num) if op == "<=" else value >= float(num)
    return "met" if ok else "missed"


class PlainWriter:
    """The P7 baseline: at each checkpoint, copy the state into preallocated buffers and write
    and fsync those bytes to a new file from a background thread (one write in flight)."""

    def __init__(self, work: Path, tensors: list[torch.Tensor]) -> None:
        self.work, self.tensors = work, tensors
        self.buffers = [torch.empty_like(t) for t in tensors]
        self.thread: threading.Thread | None = None
        self.n = 0

    def save(self) -> None:
        if self.thread is not None:
            self.thread.join()
        for b, t in zip(self.buffers, self.tensors):
            b.copy_(t)
        self.n += 1
        self.thread = threading.Thread(target=self._write, args=(self.work / f"plain-{self.n}.bin",))
        self.thread.start()

    def _write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.writelines(memoryview(b.numpy()).cast("B") for b in self.buffers)
            f.flush()
            os.fsync(f.fileno())
        old = self.work / f"plain-{self.n - 1}.bin"
        old.unlink(missing_ok=True)

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
        for p in self.work.glob("plain-*.bin"):
            p.unlink()


def e2e_loop(work: Path, pairs: int = 2) -> dict[str, float]:
    """Slowdown of a CPU training loop that checkpoints a ~400 MB model + AdamW state every
    ~6 s of compute: with ckpt_track (overlap on and off) and with a plain background write of
    the same bytes, each against the same loop without checkpoints, interleaved."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])  # ~134 MB of weights
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
    state_mb = nbytes(state_tensors(model, opt)) / 1e6

    def loop(kind: str) -> float:
        run = ct.init(project="bench-loop", monitor=None, settings={"overlap": kind != "ct_no_overlap"}) \
            if kind.startswith("ct") else None
        plain = PlainWriter(work, state_tensors(model, opt)) if kind == "plain_write" else None
        counted = len(_writer_cpu)
        t0 = time.perf_counter()  # the one-time init is not part of the loop
        for i in range(1, steps + 1):
            step()
            if i % every == 0:
                if run is not None:
                    run.log_checkpoint(i, model=model, optimizer=opt)
                elif plain is not None:
                    plain.save()
        if run is not None:
            run.finish()
        if plain is not None:
            plain.finish()
        elapsed = time.perf_counter() - t0
        if run is not None:
            writer_share[kind].append(sum(_writer_cpu[counted:]) / elapsed)
        return elapsed

    kinds = ["none", "ct", "plain_write", "ct_no_overlap"]
    writer_share: dict[str, list[float]] = {"ct": [], "ct_no_overlap": []}
    slow: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    for n in range(pairs):
        order = kinds if n % 2 == 0 else [kinds[0], *kinds[:0:-1]]
        times = {k: loop(k) for k in order}
        for k in kinds[1:]:
            slow[k].append(times[k] / times["none"] - 1.0)
    med = {k: statistics.median(v) for k, v in slow.items()}
    ratio = med["ct"] / med["plain_write"] if med["plain_write"] > 0 else float("inf")
    return {**med, "ratio": ratio, "every": every, "interval": every * per_step, "pairs": pairs,
            "state_mb": state_mb, "writer_share": statistics.median(writer_share["ct"])}


if __name__ == "__main__":
    main()
