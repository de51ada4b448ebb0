"""GPU checkpointing: ckpt_track's loop pause, the step slowdown while a save is in flight and the
verified restore, against a pinned device-to-host copy, PyTorch DCP async_save, torch.save and
torch.load, all in one process on the same training state (interleaved A/B rounds, medians, ratios).

    python benchmarks/bench_gpu.py [--gib 4] [--budget-s 270] [--out FILE]      # one GPU (H200: < 5 min)
    python benchmarks/bench_gpu.py --device cpu --gib 0.1                        # reduced form, for testing

State: a stack of fp32 ``Linear`` layers (TF32 matmuls on CUDA) with AdamW, whose weights plus AdamW state
(exp_avg, exp_avg_sq) are ``--gib`` GiB on the device, trained in a real forward/backward/step loop on random
data. The store is the local backend in a temporary directory (``--dir``, default the system's temp dir).

Goals (issue "Speed", GPU), all ratios:
  P2 loop pause of run.log_checkpoint(step, model=, optimizer=) <= 0.25x a pinned device-to-host copy of the
     whole state into preallocated buffers, and <= 0.1x the pause of torch.distributed.checkpoint.async_save
  P2 step slowdown while a save is in flight <= 3% (median step time of the --steps steps right after
     log_checkpoint against the median step time with no save in flight, same run)
  P4 verified restore to the GPU (ct.restore) >= 10x torch.load(weights_only=True, map_location="cuda") +
     load_state_dict of model and optimizer, page cache warm
The loop pause and the slowdown are measured with the default (overlap on) and with ``overlap=False`` when
``log_checkpoint`` accepts that keyword ("n/a" otherwise). Every phase is guarded: one that fails is reported
as "failed: <error>" and the rest still run. ``--budget-s`` bounds the whole run (repeats are cut when it runs
late; a phase that cannot fit is reported as skipped). Results go into the bench_gpu section of
benchmarks/RESULTS.md, to stdout and, with ``--out FILE``, to FILE.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here, imports included

import argparse
import gc
import inspect
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section

import ckpt_track as ct


class OutOfTime(Exception):
    """The overall budget ran out (raised by the SIGALRM watchdog)."""


class Budget:
    """Wall-clock budget of the whole run, counted from the script's start."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - _T0

    def left(self) -> float:
        return self.total - self.elapsed()

    def allows(self, need: float, share: float = 1.0) -> bool:
        """Whether ``need`` more seconds still end within ``share`` of the budget."""
        return self.elapsed() + need <= self.total * share


class Bench:
    """The state under test, the measurements and the per-phase errors."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.budget = Budget(args.budget_s)
        self.res: dict[str, list[float]] = {}
        self.info: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # phase -> its first error
        self.attempts: dict[str, list[int]] = {}  # phase -> [runs, failures]
        self.work = Path(tempfile.mkdtemp(prefix="ckpt-bench-gpu-", dir=args.dir or default_parent()))
        os.environ["CKPT_TRACK_LOCAL__ROOT"] = str(self.work / "store")
        self.model, self.opt, self.width, self.layers = make_state(args, self.dev)
        self.size = state_bytes(self.model, self.opt)

    # -- helpers ------------------------------------------------------------------------
    def add(self, key: str, value: float) -> None:
        self.res.setdefault(key, []).append(value)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def step(self) -> float:
        """One training step on fresh random data, timed to completion on the device."""
        t0 = time.perf_counter()
        x = torch.randn(self.args.batch, self.width, device=self.dev)
        loss = torch.nn.functional.mse_loss(self.model(x), x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sync()
        return time.perf_counter() - t0

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a block; an error marks ``name`` failed (the rest of the benchmark goes on)."""
        count = self.attempts.setdefault(name, [0, 0])
        count[0] += 1
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- reported, not raised: the other phases still run
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if isinstance(e, OutOfTime):
                msg = str(e) if str(e).startswith("skipped") else f"skipped: {e}"
            self.failed.setdefault(name, msg)
            count[1] += 1
            print(f"[{name}] failed: {msg}", file=sys.stderr)
            traceback.print_exc()
        finally:
            self.free()

    def ok(self, name: str, tries: int = 1) -> bool:
        """Whether ``name`` failed fewer than ``tries`` times (a save is retried in the next round once)."""
        return self.attempts.get(name, [0, 0])[1] < tries and not self.failed.get(name, "").startswith("skipped")


def make_state(args: argparse.Namespace, dev: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, int]:
    """fp32 Linear stack + AdamW whose weights + AdamW state are about ``args.gib`` GiB, after one real step."""
    width = args.width or (4096 if dev.type == "cuda" else 1024)
    params = args.gib * 2**30 / 12  # fp32 weight + exp_avg + exp_avg_sq
    layers = max(2, math.ceil(params / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, device=dev)
                                  for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(min(args.batch, 256), width, device=dev)
    torch.nn.functional.mse_loss(model(x), x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, width, layers


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state_dict and of the optimizer's state."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"opt.{i}.{k}"] = v
    return out


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(model, opt).values())


def fs_of(path: Path) -> str:
    """The file system type and mount point holding ``path`` (from /proc/mounts)."""
    best = ("?", "/")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (str(path) + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best[1]):
                best = (parts[2], parts[1])
    except OSError:
        pass
    return f"{best[0]} on {best[1]}"


def default_parent() -> str:
    """The system temp dir, unless it is held in memory (tmpfs): then build/ of this repo (git-ignored), on disk."""
    tmp = tempfile.gettempdir()
    if fs_of(Path(tmp).resolve()).split()[0] in ("tmpfs", "ramfs"):
        parent = Path(__file__).resolve().parent.parent / "build"
        parent.mkdir(exist_ok=True)
        return str(parent)
    return tmp


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_all(paths: list[Path]) -> None:
    """Read files once so the page cache holds them."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- phase 1: pause and steps --------------------------------------------------------------
def pinned_copy(b: Bench, buffers: dict[str, torch.Tensor]) -> float:
    """Device-to-host copy of the whole state into preallocated (pinned) buffers."""
    tensors = state_tensors(b.model, b.opt)
    b.sync()
    t0 = time.perf_counter()
    for k, v in tensors.items():
        buffers[k].copy_(v, non_blocking=b.cuda)
    b.sync()
    return time.perf_counter() - t0


def clean_steps(b: Bench) -> list[float]:
    """``--steps`` training steps with no save in flight (the baseline of the save that follows)."""
    return [b.step() for _ in range(b.args.steps)]


def add_steps(b: Bench, key: str, clean: list[float], after: list[float], in_flight: int) -> None:
    b.res.setdefault(f"{key}_clean", []).extend(clean)
    b.res.setdefault("clean_steps", []).extend(clean)
    b.res.setdefault(f"{key}_steps", []).extend(after)
    b.add(f"{key}_first_step", after[0])
    b.add(f"{key}_in_flight", in_flight)


def steps_after(b: Bench, done: Callable[[], bool]) -> tuple[list[float], int]:
    """``--steps`` training steps; how many of them ended with the save still in flight."""
    times, in_flight = [], 0
    for _ in range(b.args.steps):
        times.append(b.step())
        in_flight += not done()
    return times, in_flight


def ct_save(b: Bench, run: Any, step: int, key: str, kwargs: dict[str, Any]) -> None:
    """One log_checkpoint: its pause, the steps right after it, and the time until it is stored."""
    clean = clean_steps(b)
    b.sync()  # the pause is log_checkpoint's own, not the training work queued before it
    t0 = time.perf_counter()
    handle = run.log_checkpoint(step, model=b.model, optimizer=b.opt, **kwargs)
    pause = time.perf_counter() - t0
    times, in_flight = steps_after(b, handle.done)
    handle.wait(timeout=max(1.0, b.budget.left()))  # a refused save raises: none of its figures count
    b.add(f"{key}_pause", pause)
    b.add(f"{key}_stored", time.perf_counter() - t0)
    add_steps(b, key, clean, times, in_flight)
    prune(run)


def stored_path(native: Any) -> Path:
    """The directory of a stored local-backend version (``LocalHandle.path``, or a mapping's "path")."""
    return Path(native.path if hasattr(native, "path") else native["path"])


def prune(run: Any) -> Path:
    """Delete all but the newest stored checkpoint of the run (keeps the disk from filling); its directory."""
    stored = ct.list_checkpoints(run.ref)
    for s in stored[:-1]:
        try:
            shutil.rmtree(stored_path(s.native), ignore_errors=True)
        except Exception as e:  # noqa: BLE001 -- only disk space: never fail a measurement for it
            print(f"could not delete an old checkpoint: {e}", file=sys.stderr)
    return stored_path(stored[-1].native)


def dcp_save(b: Bench, i: int) -> None:
    """torch.distributed.checkpoint.async_save: its pause, the steps after it, the time until written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = b.work / f"dcp-{i}"
    clean = clean_steps(b)
    b.sync()
    t0 = time.perf_counter()
    msd, osd = get_state_dict(b.model, b.opt)
    state = {"model": msd, "optim": osd}
    if b.info.get("dcp_mode") != "single-rank process group":
        try:
            fut = dcp.async_save(state, checkpoint_id=str(path), no_dist=True)
            b.info["dcp_mode"] = "no_dist=True, no process group"
        except Exception as e:  # noqa: BLE001 -- fall back to a one-rank group, as multi-GPU jobs have
            print(f"[dcp] no_dist failed ({type(e).__name__}: {e}); using a single-rank process group",
                  file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
            store = dist.FileStore(str(b.work / "pg-store"), 1)
            dist.init_process_group("cpu:gloo,cuda:nccl" if b.cuda else "gloo", store=store, rank=0, world_size=1)
            b.info["dcp_mode"] = "single-rank process group"
            b.sync()
            t0 = time.perf_counter()
            msd, osd = get_state_dict(b.model, b.opt)
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    else:
        fut = dcp.async_save(state, checkpoint_id=str(path))
    pause = time.perf_counter() - t0
    del state, msd, osd
    upload = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse with async staging, else a Future
    times, in_flight = steps_after(b, upload.done)
    upload.result(timeout=max(1.0, b.budget.left()))
    b.add("dcp_pause", pause)
    b.add("dcp_stored", time.perf_counter() - t0)
    add_steps(b, "dcp", clean, times, in_flight)
    shutil.rmtree(path, ignore_errors=True)


def save_phase(b: Bench, run: Any, has_overlap: bool) -> None:
    """Interleaved rounds: pinned copy, log_checkpoint (overlap on/off), DCP async_save, the last three each
    between --steps steps with no save in flight and --steps steps right after it."""
    buffers: dict[str, torch.Tensor] = {}
    with b.phase("pinned D2H copy"):
        for k, v in state_tensors(b.model, b.opt).items():
            buffers[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=b.cuda)
        b.info["d2h_first"] = f"{pinned_copy(b, buffers):.3f} s"  # warm-up (first touch of the buffers)
    ct_variants = [("ct_on", {"overlap": True}), ("ct_off", {"overlap": False})] if has_overlap else [("ct_on", {})]
    step_no = 0
    with b.phase("log_checkpoint warm-up"):  # the first save allocates the pinned staging buffers
        t0 = time.perf_counter()
        handle = run.log_checkpoint(step_no, model=b.model, optimizer=b.opt)
        b.info["ct_first_pause"] = f"{time.perf_counter() - t0:.3f} s"
        handle.wait(timeout=max(1.0, b.budget.left()))
        b.info["ct_first_stored"] = f"{time.perf_counter() - t0:.3f} s"
    for _ in range(3):  # warm the step (allocator, kernels) before measuring
        b.step()
    round_s = 0.0
    for r in range(b.args.repeats):
        if r > 0 and not b.budget.allows(round_s, b.args.save_share):
            print(f"save rounds cut at {r} of {b.args.repeats} (budget)")
            break
        if b.budget.left() < 0.15 * b.budget.total:  # leave room for the restore phase
            b.failed.setdefault("save rounds", "skipped: out of time budget")
            break
        t_round = time.perf_counter()
        tasks: list[tuple[str, Callable[[], None]]] = [("pinned D2H copy", lambda: b.add("d2h", pinned_copy(b, buffers)))]
        for key, kw in ct_variants:
            step_no += 1
            tasks.append((f"log_checkpoint {key}", lambda key=key, kw=kw, s=step_no: ct_save(b, run, s, key, kw)))
        tasks.append(("DCP async_save", lambda r=r: dcp_save(b, r)))
        for name, fn in (tasks if r % 2 == 0 else tasks[::-1]):  # alternate the order between rounds
            if b.ok(name, tries=2):
                with b.phase(name):
                    fn()
        round_s = time.perf_counter() - t_round
        print(f"save round {r + 1}/{b.args.repeats} done in {round_s:.1f} s (elapsed {b.budget.elapsed():.0f} s)")
    buffers.clear()  # free the pinned memory before the next phase


# -- phase 2: torch.save and restore ---------------------------------------------------------
def restore_phase(b: Bench, run: Any) -> None:
    """torch.save + fsync, then interleaved restores: ct.restore vs torch.load + load_state_dict."""
    pt = b.work / "state.pt"
    save_s = 0.0
    with b.phase("torch.save + fsync"):
        for r in range(b.args.repeats):
            if r > 0 and not b.budget.allows(save_s, b.args.torch_save_share):
                break
            if b.budget.left() < 2 * save_s + 10:
                raise OutOfTime("skipped: out of time budget")
            pt.unlink(missing_ok=True)  # a fresh file each time, like a checkpoint
            b.sync()
            t0 = time.perf_counter()
            torch.save({"model": b.model.state_dict(), "optimizer": b.opt.state_dict()}, pt)
            fsync_path(pt)
            save_s = time.perf_counter() - t0
            b.add("torch_save", save_s)
            print(f"torch.save {r + 1} done in {save_s:.1f} s")
    with b.phase("blocking save for restore"):
        if b.budget.left() < 2 * max(med(b, "ct_on_stored") or 0.0, 1.0) + 10:
            raise OutOfTime("skipped: out of time budget")
        handle = run.log_checkpoint(10**6, model=b.model, optimizer=b.opt, blocking=True)
        ref = str(handle.ref)
        newest = prune(run)
        try:
            read_all([p for p in newest.rglob("*") if p.is_file()])
        except Exception as e:  # noqa: BLE001 -- only the cache warm-up; the warm-up restore below warms it too
            print(f"page-cache warm-up of the ckpt_track files skipped: {e}", file=sys.stderr)

    def torch_restore() -> float:
        b.sync()
        t0 = time.perf_counter()
        sd = torch.load(pt, weights_only=True, map_location=b.dev)
        b.model.load_state_dict(sd["model"])
        b.opt.load_state_dict(sd["optimizer"])
        b.sync()
        dt = time.perf_counter() - t0
        del sd
        b.free()
        return dt

    def ct_restore() -> float:
        b.sync()
        t0 = time.perf_counter()
        ct.restore(ref, model=b.model, optimizer=b.opt)
        b.sync()
        dt = time.perf_counter() - t0
        b.free()
        return dt

    if not pt.exists() and not b.ok("blocking save for restore"):
        return  # nothing to restore from (both reported above)
    pair_s = 0.0
    for i in range(b.args.repeats + 1):  # pair 0 is the warm-up (page cache, allocator), not counted
        if i > 1 and not b.budget.allows(pair_s + 5):
            print(f"restore pairs cut at {i - 1} of {b.args.repeats} (budget)")
            break
        if i <= 1 and b.budget.left() < pair_s + 5:
            b.failed.setdefault("restore", "skipped: out of time budget")
            break
        t_pair = time.perf_counter()
        pair = [("torch.load + load_state_dict", "torch_load", torch_restore), ("ct.restore", "ct_restore", ct_restore)]
        for name, key, fn in (pair if i % 2 == 0 else pair[::-1]):
            if b.ok(name) and (key != "torch_load" or pt.exists()) and (key != "ct_restore" or b.ok("blocking save for restore")):
                with b.phase(name):
                    dt = fn()
                    if i > 0:
                        b.add(key, dt)
                    else:
                        b.info[f"{key}_first"] = f"{dt:.3f} s"
        pair_s = time.perf_counter() - t_pair
        print(f"restore pair {i}/{b.args.repeats} done in {pair_s:.1f} s")
    pt.unlink(missing_ok=True)


# -- report ------------------------------------------------------------------------------------
def med(b: Bench, key: str) -> float | None:
    v = b.res.get(key)
    return statistics.median(v) if v else None


def ratio(a: float | None, c: float | None) -> float | None:
    return None if a is None or c is None or c == 0 else a / c


def report(b: Bench, has_overlap: bool) -> str:
    def slowdown(key: str) -> float | None:
        after, clean = med(b, f"{key}_steps"), med(b, f"{key}_clean")
        return None if after is None or clean is None else after / clean - 1.0

    def mean_slowdown(key: str) -> float | None:
        after, base = b.res.get(f"{key}_steps"), b.res.get(f"{key}_clean")
        return None if not after or not base else statistics.fmean(after) / statistics.fmean(base) - 1.0

    def why(*names: str) -> str:
        for n in names:
            if n in b.failed:
                msg = b.failed[n]
                return msg if msg.startswith("skipped") else "failed: " + (msg if len(msg) <= 120 else msg[:120] + "...")
        return "n/a"

    n = b.args.steps
    off = "n/a (log_checkpoint has no overlap keyword)"
    goals: list[tuple[str, float | None, str, str]] = [
        ("P2 loop pause (overlap on) / pinned D2H copy", ratio(med(b, "ct_on_pause"), med(b, "d2h")), "<= 0.25",
         why("log_checkpoint ct_on", "pinned D2H copy")),
        ("P2 loop pause (overlap on) / DCP async_save pause", ratio(med(b, "ct_on_pause"), med(b, "dcp_pause")), "<= 0.1",
         why("log_checkpoint ct_on", "DCP async_save")),
        (f"P2 step slowdown while a save is in flight (overlap on; median of the {n} steps after vs. {n} before)",
         slowdown("ct_on"), "<= 0.03", why("log_checkpoint ct_on")),
        ("P2 loop pause (overlap=False) / pinned D2H copy", ratio(med(b, "ct_off_pause"), med(b, "d2h")), "<= 0.25",
         why("log_checkpoint ct_off", "pinned D2H copy") if has_overlap else off),
        ("P2 loop pause (overlap=False) / DCP async_save pause", ratio(med(b, "ct_off_pause"), med(b, "dcp_pause")),
         "<= 0.1", why("log_checkpoint ct_off", "DCP async_save") if has_overlap else off),
        (f"P2 step slowdown while a save is in flight (overlap=False; median of {n} after vs. {n} before)",
         slowdown("ct_off"), "<= 0.03", why("log_checkpoint ct_off") if has_overlap else off),
        ("P4 restore speed to the GPU / (torch.load + load_state_dict)", ratio(med(b, "torch_load"), med(b, "ct_restore")),
         ">= 10", why("ct.restore", "torch.load + load_state_dict", "blocking save for restore", "torch.save + fsync",
                      "restore")),
    ]
    goal_rows = "\n".join(
        f"| {name} | {value:.3f} | {goal} | {'met' if _met(value, goal) else 'missed'} |" if value is not None
        else f"| {name} | {missing} | {goal} | |"
        for name, value, goal, missing in goals)

    gb = b.size / 1e9
    labels = [
        ("clean_steps", "training step, no save in flight (all baselines)", False),
        ("d2h", "pinned D2H copy of the whole state (preallocated buffers)", True),
        ("ct_on_pause", "log_checkpoint pause" + (" (overlap on)" if has_overlap else " (default)"), False),
        ("ct_on_stored", "log_checkpoint until stored (steps running meanwhile)", False),
        ("ct_on_first_step", "first step after log_checkpoint", False),
        ("ct_on_steps", f"the {n} steps after log_checkpoint", False),
        ("ct_on_in_flight", f"of those {n}, steps with the save still in flight", None),
        ("ct_off_pause", "log_checkpoint pause (overlap=False)", False),
        ("ct_off_stored", "log_checkpoint until stored (overlap=False)", False),
        ("ct_off_first_step", "first step after log_checkpoint (overlap=False)", False),
        ("ct_off_steps", f"the {n} steps after log_checkpoint (overlap=False)", False),
        ("ct_off_in_flight", f"of those {n}, steps with the save in flight (overlap=False)", None),
        ("dcp_pause", "DCP async_save pause (get_state_dict + async_save)", False),
        ("dcp_stored", "DCP async_save until written (steps running meanwhile)", False),
        ("dcp_first_step", "first step after DCP async_save", False),
        ("dcp_steps", f"the {n} steps after DCP async_save", False),
        ("dcp_in_flight", f"of those {n}, steps with the DCP save in flight", None),
        ("torch_save", "torch.save + fsync (from the device tensors)", True),
        ("torch_load", "torch.load(map_location=device) + load_state_dict (model, optimizer)", True),
        ("ct_restore", "ct.restore(ref, model=, optimizer=), verified", True),
    ]
    rows = []
    for key, label, throughput in labels:
        v = b.res.get(key)
        if not v:
            continue
        m = statistics.median(v)
        if throughput is None:
            rows.append(f"| {label} | {m:.0f} of {n} | {len(v)} | |")
        else:
            tp = f"{gb / m:.2f} GB/s" if throughput and m > 0 else ""
            rows.append(f"| {label} | {m * 1000:.1f} ms | {len(v)} | {tp} |")
    extra = [f"{label}: {mean_slowdown(k):+.1%}" for k, label in
             (("ct_on", "overlap on" if has_overlap else "default"), ("ct_off", "overlap=False"), ("dcp", "DCP"))
             if mean_slowdown(k) is not None]
    notes = [
        (f"- First calls (not in the medians): log_checkpoint pause {b.info.get('ct_first_pause', 'n/a')} "
        f"(allocates the pinned staging buffers), stored after {b.info.get('ct_first_stored', 'n/a')}; pinned copy "
        f"{b.info.get('d2h_first', 'n/a')}; torch.load restore {b.info.get('torch_load_first', 'n/a')}, ct.restore "
        f"{b.info.get('ct_restore_first', 'n/a')}"),
    ]
    if extra:
        notes.append(f"- Mean step time of the {n} steps after a save vs. the mean of the {n} clean steps just "
                     f"before it (the first step after a save carries any wait for the copies): " + ", ".join(extra))
    if b.failed:
        notes.append("- Failed or skipped: " + "; ".join(
            f"{k}: {v}" if v.startswith("skipped") else
            f"{k}: failed {b.attempts.get(k, [0, 0])[1]} of {b.attempts.get(k, [0, 0])[0]} runs, first error: {v}"
            for k, v in b.failed.items()))
    gpu = torch.cuda.get_device_name(b.dev) if b.cuda else "none (CPU run, reduced form)"
    dtype = "fp32 weights + fp32 AdamW state" + (", TF32 matmuls" if b.cuda else "")
    return f"""## GPU checkpointing (`benchmarks/bench_gpu.py`)

{machine()}
- GPU: {gpu}; device {b.dev}; torch {torch.__version__} (CUDA {torch.version.cuda}), ckpt_track {ct.__version__}, backend local
- State: {b.size / 2**30:.2f} GiB ({dtype}; {b.layers} x Linear({b.width}, {b.width}), batch {b.args.batch}); \
store on {fs_of(b.work)}
- log_checkpoint `overlap` keyword: {"present" if has_overlap else "absent (overlap=False rows n/a)"}; DCP: \
{b.info.get("dcp_mode", "n/a")}, default stager
- Interleaved rounds (order alternating), medians; {len(b.res.get("d2h", []))} save rounds, \
{len(b.res.get("ct_restore", []))} restore pairs, {n} steps per measurement; run took {b.budget.elapsed():.0f} s \
of a {b.budget.total:.0f} s budget

| goal | ratio | target | |
|---|---:|---|---|
{goal_rows}

| measurement (median) | time | n | throughput |
|---|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(notes)}
"""


def _met(value: float, goal: str) -> bool:
    op, num = goal.split()
    return value <= float(num) if op == "<=" else value >= float(num)


def main() -> None:
    ap = argparse.ArgumentParser(description="GPU checkpointing: ckpt_track against a pinned copy, DCP and torch.save/load.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="device holding the state: cuda (default) or cpu (reduced test)")
    ap.add_argument("--gib", type=float, default=4.0, help="weights + AdamW state on the device, GiB (default 4)")
    ap.add_argument("--width", type=int, default=0, help="Linear width (default 4096 on cuda, 1024 on cpu)")
    ap.add_argument("--batch", type=int, default=0, help="rows per training step (default 16384 on cuda, 256 on cpu)")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps timed after each save and with none in flight (default 20 on cuda, 10 on cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of each measurement, fewer when running late")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="overall time budget in seconds, from the start (default 270); repeats are cut to fit")
    ap.add_argument("--save-share", type=float, default=0.55,
                    help="part of the budget the save rounds may use before the torch.save and restore phases")
    ap.add_argument("--torch-save-share", type=float, default=0.75,
                    help="part of the budget by which the torch.save repeats must end")
    ap.add_argument("--dir", default=None, help="parent of the temporary work directory (default: the system temp dir, or build/ if that is tmpfs)")
    ap.add_argument("--out", default=None, help="also write the results section to this file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("CUDA is not available; use --device cpu for the reduced form")
    args.batch = args.batch or (16384 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 10)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as fp32 training on Hopper runs

    def alarm(signum: int, frame: Any) -> None:
        raise OutOfTime(f"overall budget of {args.budget_s:.0f} s exceeded")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(args.budget_s - (time.perf_counter() - _T0)) + 15))  # watchdog: report what we have

    b = Bench(args)
    free_disk = shutil.disk_usage(b.work).free
    print(f"state: {b.size / 2**30:.2f} GiB in {len(state_tensors(b.model, b.opt))} tensors on {b.dev}; "
          f"work dir {b.work} ({fs_of(b.work)}, {free_disk / 2**30:.0f} GiB free)")
    if free_disk < 4 * b.size:
        print(f"warning: only {free_disk / 2**30:.1f} GiB free for a {b.size / 2**30:.1f} GiB state", file=sys.stderr)
    run = None
    has_overlap = False
    try:
        with b.phase("ct.init"):
            run = ct.init(project="bench-gpu", name="bench-gpu", resume="never", monitor=None)
            has_overlap = "overlap" in inspect.signature(run.log_checkpoint).parameters
        if run is not None:
            save_phase(b, run, has_overlap)
            restore_phase(b, run)
    finally:
        signal.alarm(0)
        body = report(b, has_overlap)
        if run is not None:
            with b.phase("run.finish"):
                run.finish()
        write_section("bench_gpu", body)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(body)
        print(body)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        shutil.rmtree(b.work, ignore_errors=True)


if __name__ == "__main__":
    main()
