"""One rank of the multi-rank tests, started by :mod:`distributed.launch` (like torchrun:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python tests/distributed/worker.py '<json args>'

Scenarios (``args["do"]``):
- ``train``: build the model (``kind``: ddp, fsdp, tp), ``run.resume``, train to ``steps``,
  checkpoint every ``every`` steps; ``die_after`` SIGKILLs this rank right after the
  checkpoint of that step is committed; at the end writes the full model and optimizer state
  (gathered) to ``out/rank<r>.safetensors``.
- ``restore``: build the model at this world size, ``ct.restore(ref)`` and write the state.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[2]))

import ckpt_track as ct

WIDTH = 32


def build(kind: str, world: int, frozen: bool = False, width: int = WIDTH) -> tuple[torch.nn.Module,
                                                                                    torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    if frozen:  # a frozen base and a trainable adapter (the last layer)
        for p in list(model.parameters())[:-2]:
            p.requires_grad_(False)
    if kind == "ddp" and world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp" and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "tp" and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "3": RowwiseParallel()})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def batch(step: int, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + (0 if kind == "tp" else rank))  # TP ranks see the same data
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True) if dist.is_initialized() else None
    msd, osd = get_state_dict(model, opt, options=full) if full else get_state_dict(model, opt)
    out = {f"model/{k}": v.detach().clone().contiguous() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"opt/{fqn}/{k}"] = v.detach().clone().contiguous().reshape(v.shape)
    return out


def train(args: dict, rank: int, world: int) -> None:
    kind = args.get("kind", "ddp")
    model, opt = build(kind, world, args.get("frozen", False), args.get("width", WIDTH))
    torch.manual_seed(100 + rank)  # dropout differs per rank: each rank must get its own RNG back
    faults(args, rank)
    if args.get("only_rank0") and rank != 0:
        run = None
    else:
        run = ct.init(project="dist", name=args.get("name", "r"), backend=args.get("backend", "local"))
    if run is None:
        start = 0
    else:
        start = run.resume(model=model, optimizer=opt) if args.get("resume", True) else 0
    Path(args["out"], f"start{rank}.txt").write_text(str(start))
    if run is not None:
        Path(args["out"], f"ref{rank}.txt").write_text(str(run.ref))
    for step in range(start, args["steps"]):
        x, y = batch(step, rank, kind)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if run is not None and args.get("every") and (step + 1) % args["every"] == 0:
            for _ in range(args.get("repeat", 1)):  # repeat: the same state logged again (unchanged)
                h = run.log_checkpoint(step, model=model, optimizer=opt, metrics={"loss": 1.0 / (step + 1)})
            if args.get("die_after") == step:
                h.wait()
                os.kill(os.getpid(), signal.SIGKILL)
    if run is not None:
        run.finish()
    save_file(full_state(model, opt), str(Path(args["out"], f"rank{rank}.safetensors")))


def faults(args: dict, rank: int) -> None:
    """Fault injection: ``no_pickle`` makes every unpickling entry point raise; ``kill_in_write``
    ``[rank, n]`` SIGKILLs that rank inside its n-th shard write; ``kill_before_commit`` ``n``
    SIGKILLs rank 0 in its n-th commit, after every rank's writes were gathered."""
    if args.get("no_pickle"):
        import pickle

        def refuse(*a: object, **k: object) -> None:
            raise AssertionError("pickle/torch.load was called")

        pickle.load = pickle.loads = torch.load = refuse  # type: ignore[assignment]
    from ckpt_track.distributed import run as drun
    from ckpt_track.distributed import storage

    if args.get("kill_in_write") and args["kill_in_write"][0] == rank:
        real, count = storage.write_blobs, [0]

        def dying(tmp, tensors, **kw):  # type: ignore[no-untyped-def]
            count[0] += 1
            if count[0] == args["kill_in_write"][1]:
                real(tmp, dict(list(tensors.items())[:1]), **kw)  # part of it on disk, then gone
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tmp, tensors, **kw)

        storage.write_blobs = dying
    if args.get("kill_before_commit") and rank == 0:
        real_c, n = drun.commit_staged, [0]

        def dying_commit(*a, **kw):  # type: ignore[no-untyped-def]
            n[0] += 1
            if n[0] == args["kill_before_commit"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_c(*a, **kw)

        drun.commit_staged = dying_commit


def hang(args: dict, rank: int, world: int) -> None:
    """Rank 0 saves; rank 1 never joins the save (it hangs): rank 0 must get a typed error."""
    model, opt = build("none", world)
    run = ct.init(project="dist", name="hang")
    if rank != 0:
        time.sleep(3600)
    t = time.monotonic()
    try:
        run.log_checkpoint(1, model=model, optimizer=opt).wait()
    except ct.errors.CkptTrackError as exc:
        Path(args["out"], "error.txt").write_text(f"{type(exc).__name__}|{time.monotonic() - t:.1f}|{exc}")
        os._exit(3)
    os._exit(0)


def restore(args: dict, rank: int, world: int) -> None:
    model, opt = build(args.get("kind", "fsdp"), world)
    got = ct.restore(args["ref"], model=model, optimizer=opt) if args.get("optimizer", True) else \
        ct.restore(args["ref"], model=model)
    Path(args["out"], f"step{rank}.txt").write_text(str(got.step))
    if args.get("optimizer", True):
        save_file(full_state(model, opt), str(Path(args["out"], f"rank{rank}.safetensors")))


def main() -> None:
    args = json.loads(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    {"train": train, "restore": restore, "hang": hang}[args["do"]](args, rank, world)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
