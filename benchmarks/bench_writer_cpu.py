"""CPU seconds per GiB of a checkpoint, per backend: the writer thread (hash + write + fsync into
the spool, the same on every backend) and the upload thread (handing the version to the tracker).

    python benchmarks/bench_writer_cpu.py [--mib 256] [--versions 3] [--backends local,mlflow,wandb,clearml,comet]

Each backend runs in its own process with only ``CKPT_TRACK_BACKEND`` changed (MLflow on a sqlite
store with a local artifact root, W&B, ClearML and Comet in their offline modes, as in
``bench_incremental.py``).  Every version changes every tensor (a model + AdamW state), so each
writes and uploads all of its bytes.  CPU time is per thread (``time.thread_time``), counted
around ckpt_track's write of a checkpoint and around each upload pass.
Goal (issue "Speed close to the limit"): writer <= 0.3 CPU-seconds per GiB on every backend.
The upload thread's figure is the tracker SDK's own cost (what it copies, zips or hashes), reported
as is.  Results go into the bench_writer_cpu section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_incremental import _env  # the same offline settings per backend
from common import count_thread_cpu, machine, write_section


def child(mib: int, versions: int, out: Path) -> None:
    import ckpt_track as ct
    from ckpt_track import checkpointing, delivery
    from ckpt_track.state import capture

    writer = count_thread_cpu(checkpointing, "write_checkpoint")  # the writer thread, per checkpoint
    upload = count_thread_cpu(delivery.Delivery, "drain")  # the upload thread, per pass
    width = 2048
    layers = max(1, round(mib * 2**20 / (3 * width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, width)
    nbytes = 0
    with ct.init(project="bench-cpu", name="cpu", monitor=None) as run:
        for step in range(1, versions + 1):
            model(x).square().mean().backward()
            opt.step()  # every tensor changes
            opt.zero_grad()
            run.log_checkpoint(step, model=model, optimizer=opt).wait()
            if step == 1:
                nbytes = sum(t.numel() * t.element_size() for t in capture(
                    step=0, model=model, optimizer=opt, rng=False).tensors.values())
    gib = nbytes * versions / 2**30
    out.write_text(json.dumps({"writer": sum(writer) / gib, "upload": sum(upload) / gib, "gib": gib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="model weights + AdamW state per version")
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--backends", default="local,mlflow,wandb,clearml,comet")
    ap.add_argument("--child", nargs=3, metavar=("MIB", "VERSIONS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), Path(args.child[2]))
        return
    rows = []
    for backend in args.backends.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ckpt-cpu-{backend}-"))
        out = work / "out.json"
        done = subprocess.run([sys.executable, __file__, "--child", str(args.mib), str(args.versions), str(out)],
                              cwd=work, env=_env(backend, work), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{backend}: the benchmark child failed")
        res = json.loads(out.read_text())
        shutil.rmtree(work, ignore_errors=True)
        print(backend, res)
        rows.append(f"| {backend} | {res['writer']:.3f} | {res['upload']:.3f} | "
                    f"{'met' if res['writer'] <= 0.3 else 'missed'} |")
    body = f"""## Writer and upload CPU per GiB, per backend (`benchmarks/bench_writer_cpu.py`)

{machine()}
- torch {torch.__version__}; {args.versions} versions of about {args.mib} MiB (model weights + AdamW state,
  every tensor changed each time), one process per backend, only `CKPT_TRACK_BACKEND` changed
- CPU-seconds per GiB of checkpoint, per thread: the writer thread (hash + write + fsync into the spool) and
  the upload thread (the backend and its SDK: linking into the store, copying to MLflow's artifact root,
  staging for W&B, zipping for ClearML and Comet offline)

| backend | writer CPU-s / GiB | upload CPU-s / GiB | writer goal <= 0.3 |
|---|---:|---:|---|
{chr(10).join(rows)}
"""
    write_section("bench_writer_cpu", body)
    print(body)


if __name__ == "__main__":
    main()
