"""Multi-rank checkpoints: plain DCP ``save`` / ``async_save`` / ``load`` and ckpt_track side
by side, in one run, on the same FSDP2 model and AdamW state.

Usage: python benchmarks/bench_distributed.py [--ranks 2] [--mb 128] [--repeats 3] [--device cpu|cuda]

Every rank holds its shard of a model of ``--mb`` MiB of fp32 parameters (plus AdamW's two
moments: 3x that in all).  Each measurement starts after a barrier and counts the slowest
rank; rounds are interleaved (DCP save, DCP async_save, ckpt_track, for each round) and every
round changes every tensor first, so no method skips unchanged data.  Measured:

- stall: how long the training loop is blocked (``dcp.save`` blocks for all of it);
- committed: until the checkpoint is complete and durable on disk (ckpt_track: the version
  committed to the spool by rank 0, every file hashed: ``handle.committed()``; a crash after
  it loses nothing); stored: until the local backend holds it too (``handle.wait()``);
- restore: ``dcp.load`` into the live state dict vs ``run.resume`` (every file verified).

Results go into the bench_distributed section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import RESULTS, free_port, machine, write_section

GOALS = {  # (numerator, denominator, target)
    "training stall / DCP async_save's": ("ct_stall", "async_stall", 1.1),
    "time to a committed version / DCP save's": ("ct_committed", "dcp_save", 1.25),
    "verified restore / DCP load's": ("ct_restore", "dcp_load", 1.25),
}


def _model(mb: int, device: str) -> torch.nn.Module:
    width = 1024
    layers = max(1, mb * 2**20 // (4 * width * width))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def _slowest(seconds: float, device: str) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _perturb(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
            for v in opt.state[p].values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    v.add_(1e-3)


def _timed(fn, device: str) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    dist.barrier()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def worker(rank: int, world: int, args: argparse.Namespace, port: int, root: str, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckpt_track as ct

    model = _model(args.mb, device)
    mesh = init_device_mesh(device, (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, 1024, device=device)).sum().backward()
    opt.step()
    side = dist.new_group(backend="gloo")  # DCP's async save on its own group, as its docs advise
    run = ct.init(project="bench", name="dist", backend="local", settings={"local": {"root": f"{root}/ct"}})
    times: dict[str, list[float]] = {k: [] for k in ("dcp_save", "async_stall", "async_committed", "ct_stall",
                                                     "ct_committed", "ct_stored", "dcp_load", "ct_restore")}

    def dcp_round(i: int) -> None:
        _perturb(model, opt)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        s, _ = _timed(lambda: dcp.save(sd, checkpoint_id=f"{root}/dcp{i}"), device)
        times["dcp_save"].append(_slowest(s, device))
        d = f"{root}/async{i}"
        s, fut = _timed(lambda: dcp.async_save(sd, checkpoint_id=d, process_group=side), device)
        w, _ = _timed(lambda: fut.result(), device)  # type: ignore[union-attr]
        times["async_stall"].append(_slowest(s, device))
        times["async_committed"].append(_slowest(s + w, device))

    def ct_round(i: int) -> None:
        _perturb(model, opt)
        s, handle = _timed(lambda: run.log_checkpoint(i, model=model, optimizer=opt), device)
        w, _ = _timed(lambda: handle.committed(), device)  # type: ignore[union-attr]
        u, _ = _timed(lambda: handle.wait(), device)  # type: ignore[union-attr]
        times["ct_stall"].append(_slowest(s, device))
        times["ct_committed"].append(_slowest(s + w, device))
        times["ct_stored"].append(_slowest(s + w + u, device))

    for i in range(args.repeats):
        for one_round in (ct_round, dcp_round) if i % 2 else (dcp_round, ct_round):  # alternate the order
            one_round(i)
        msd, osd = get_state_dict(model, opt)
        target = {"model": msd, "optim": osd}
        s, _ = _timed(lambda: dcp.load(target, checkpoint_id=f"{root}/dcp{i}"), device)  # noqa: B023
        times["dcp_load"].append(_slowest(s, device))
        s, _ = _timed(lambda: run.resume(model=model, optimizer=opt), device)
        times["ct_restore"].append(_slowest(s, device))
    run.finish()
    if rank == 0:
        queue.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def render(med: dict[str, float], args: argparse.Namespace) -> str:
    rows = "\n".join(f"| {name} | {med[a] / med[b]:.2f} | <= {t} | {'met' if med[a] / med[b] <= t else 'missed'} |"
                     for name, (a, b, t) in GOALS.items())
    meas = "\n".join(f"| {k} | {v:.3f} s |" for k, v in med.items())
    state = 3 * args.mb
    return f"""## Multi-rank checkpoints (`benchmarks/bench_distributed.py`)

{machine()}
- torch {torch.__version__}, {args.ranks} ranks on {args.device} ({'gloo' if args.device == 'cpu' else 'nccl'}),
  FSDP2 (`fully_shard`), {args.mb} MiB of fp32 parameters + AdamW state = {state} MiB in all;
  {args.repeats} interleaved rounds, medians of the slowest rank

| goal | ratio | target | |
|---|---:|---|---|
{rows}

| measurement (median, slowest rank) | time |
|---|---:|
{meas}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mb", type=int, default=128, help="MiB of fp32 parameters (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md as it is")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as root:
        mp.spawn(worker, args=(args.ranks, args, free_port(), root, queue), nprocs=args.ranks, join=True)
        med = queue.get()
    text = render(med, args)
    print(text)
    if not args.no_write:
        write_section(f"bench_distributed_{args.device}", text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
