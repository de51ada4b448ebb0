"""Checkpoints in object storage: ckpt_track against plain s3fs on the same bytes, in one run,
against a real S3 server on the loopback interface (SeaweedFS ``weed mini``).

Usage: python benchmarks/bench_object_store.py [--mb 1024] [--repeats 3]

The state is a model's weights plus AdamW's two moments (``--mb`` MiB in all), written once as a
committed ckpt_track checkpoint.  Rounds are interleaved, each into a fresh prefix (nothing is
deduplicated between methods or rounds):

- save: ``s3fs.put`` of the checkpoint's files vs ckpt_track storing the same checkpoint in an
  ``s3://`` store (existence checks, the same parallel multipart uploads, the manifest committed
  create-only);
- restore: ``s3fs.get`` of the same files into a fresh directory vs ckpt_track's verified fetch
  (download into the cache and every byte hashed against the manifest), and the whole
  ``ct.restore`` into the model;
- re-log: the bytes sent when the unchanged state is logged again (content addressing: only the
  manifest and ``state.json``).

Results go into the bench_object_store section of benchmarks/RESULTS.md.
"""

# ruff: noqa: B023 - each lambda is timed (called) at once, inside its own round
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import RESULTS, machine, write_section
from s3_server import S3Server

import ckpt_track as ct
from ckpt_track.backends.local import LocalBackend
from ckpt_track.format import MANIFEST, LocalCheckpoint, read_manifest, verify
from ckpt_track.records import RunSpec

GOALS = {  # (numerator, denominator, target): throughput ratios, higher is better
    "save throughput / s3fs put's": ("s3fs_put", "ct_save", 0.9),
    "verified fetch throughput / s3fs get's": ("s3fs_get", "ct_fetch", 0.9),
}


def _state(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 1024
    layers = max(1, mb * 2**20 // 3 // (4 * width * width))  # weights + AdamW's exp_avg and exp_avg_sq
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = S3Server(work / "s3").start()
    try:
        os.environ.update(server.env())
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")
        os.chdir(work)
        return _run(args, work, server)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, server: S3Server) -> int:
    model, opt = _state(args.mb)
    seed = ct.init(project="bench", name="source", backend="local", settings={"local": {"root": str(work / "disk")}})
    ckpt_stored = seed.log_checkpoint(0, model=model, optimizer=opt).wait()
    seed.finish()
    assert ckpt_stored is not None
    src = Path(ckpt_stored.native.path)
    files = [f for f in os.listdir(src) if f != MANIFEST]
    size = sum((src / f).stat().st_size for f in files)
    fs = server.filesystem()
    times: dict[str, list[float]] = {k: [] for k in ("s3fs_put", "ct_save", "s3fs_get", "ct_fetch", "ct_restore")}
    ckpt = LocalCheckpoint(src, read_manifest(src))
    for r in range(args.repeats):
        plain = f"{server.bucket}/plain-{r}-{uuid.uuid4().hex[:6]}"
        times["s3fs_put"].append(_timed(lambda: fs.put([str(src / f) for f in files], [f"{plain}/{f}" for f in files])))
        root = f"s3://{server.bucket}/ct-{r}-{uuid.uuid4().hex[:6]}"
        backend = LocalBackend({"root": root})
        info = backend.open_run(RunSpec(project="bench", name="b"))
        stored: list = []
        times["ct_save"].append(_timed(lambda: stored.append(backend.put(info, ckpt, ["latest"]))))
        out = work / f"get-{r}"
        out.mkdir()
        times["s3fs_get"].append(_timed(lambda: fs.get([f"{plain}/{f}" for f in files], [str(out / f) for f in files])))
        shutil.rmtree(out)
        dest = work / f"fetch-{r}"
        times["ct_fetch"].append(_timed(lambda: verify(backend.get(stored[0], dest).path)))
        shutil.rmtree(dest)
        os.environ["CKPT_TRACK_LOCAL__ROOT"] = root
        os.environ["XDG_CACHE_HOME"] = str(work / f"cache-{r}")  # cold: fetched from the bucket
        fresh, fresh_opt = _state(args.mb)
        times["ct_restore"].append(_timed(lambda: ct.restore(f"{info.ref}@latest", model=fresh, optimizer=fresh_opt)))
        shutil.rmtree(work / f"cache-{r}", ignore_errors=True)
        fs.rm(plain, recursive=True)
    # re-log of an unchanged state: the bytes the second version sends
    again = backend.put(info, _relog(work, model, opt), [])
    relog = again.uploaded  # the files it sent (content-addressed: only what the store lacked)
    manifest_bytes = len(fs.cat_file(again.native.path.removeprefix("s3://")))
    med = {k: statistics.median(v) for k, v in times.items()}
    gib = size / 2**30
    rows = [f"| {k} | {med[k]:.2f} s | {gib / med[k]:.2f} GiB/s | {', '.join(f'{x:.2f}' for x in v)} |"
            for k, v in times.items()]
    ratios = []
    ok = True
    for label, (base, ours, target) in GOALS.items():
        ratio = med[base] / med[ours]  # throughput ratio = inverse time ratio
        ok &= ratio >= target
        ratios.append(f"- {label}: **{ratio:.2f}x** (goal >= {target}x)")
    sent = relog + manifest_bytes
    ok &= sent <= 2**20
    body = f"""## Object storage (`benchmarks/bench_object_store.py`)

{machine()}
- Server: SeaweedFS `weed mini` on 127.0.0.1 (the same machine), s3fs {__import__("s3fs").__version__}
- State: {size / 2**20:.0f} MiB (weights + AdamW moments) in {len(files)} files; median of {args.repeats} interleaved rounds

| method | median | throughput | runs (s) |
|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(ratios)}
- unchanged state logged again sends **{sent / 1024:.1f} KiB** (tensor files {relog / 1024:.1f} KiB, manifest {manifest_bytes / 1024:.1f} KiB; goal <= 1 MiB)
- `ct_fetch` downloads into the cache and hashes every byte against the manifest; `ct_restore` is the whole
  `ct.restore` from a cold cache into the model and optimizer (fetch, verify, load).
"""
    write_section("bench_object_store", body)
    print(body)
    print(f"results written to {RESULTS}")
    return 0 if ok else 1


def _relog(work: Path, model: torch.nn.Module, opt: torch.optim.Optimizer):
    run = ct.init(project="bench", name="relog", backend="local", settings={"local": {"root": str(work / "disk2")}})
    stored = run.log_checkpoint(1, model=model, optimizer=opt).wait()
    run.finish()
    path = Path(stored.native.path)
    return LocalCheckpoint(path, read_manifest(path))


if __name__ == "__main__":
    raise SystemExit(main())
