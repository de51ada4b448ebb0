"""P5: bytes sent per new checkpoint version, on every backend, counted at the backend boundary.

    python benchmarks/bench_incremental.py [--mib 256] [--backends local,mlflow,wandb,clearml,comet]

Each backend runs in its own process with only ``CKPT_TRACK_BACKEND`` changed (MLflow on a
sqlite store with a local artifact root, W&B, ClearML and Comet in their offline modes), and
logs the same sequence of checkpoints:

  full     the first checkpoint of a run (everything is new): the baseline "full" size
  f=0.250  a quarter of the tensor bytes changed
  f=0.047  3 of 64 weights changed
  same     nothing changed
  lora     a LoRA-style fine-tune of a frozen base (adapters and their AdamW state change)

"sent" is ``Stored.uploaded``, the bytes the backend handed to the tracker for that
version.  For local and MLflow the growth of the store on disk is reported too (each file
counted once, hard links included) as a check that does not rely on the backend's own count.
Goal: sent <= f * full + 1% of full; unchanged <= 1 MB; LoRA ~ adapters + their optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 64


def _disk(root: Path) -> int:
    seen: dict[tuple[int, int], int] = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class LoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int = 8) -> None:
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.T @ self.b.T


def child(mib: int, out: Path, store: Path) -> None:
    import ckpt_track as ct

    width = int((mib * 2**20 / LAYERS / 4) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(LAYERS)])
    full_tensor_bytes = sum(p.numel() * 4 for p in model.parameters())
    rows: list[dict] = []

    def log(run: ct.Run, step: int, case: str, changed: int, **state: object) -> None:
        before = _disk(store) if store.exists() else 0
        stored = run.log_checkpoint(step, **state).wait()  # type: ignore[arg-type]
        rows.append({"case": case, "sent": stored.uploaded if stored else None, "changed": changed,
                     "disk": (_disk(store) - before) if store.exists() else None})

    with ct.init(project="bench-inc", name="dense", monitor=None) as run:
        log(run, 1, "full", full_tensor_bytes, model=model)
        for step, n in enumerate((LAYERS // 4, max(1, LAYERS // 20)), 2):
            case = f"f={n / LAYERS:.3f}"
            with torch.no_grad():
                for layer in list(model)[:n]:
                    layer.weight.add_(0.001)
            log(run, step, case, n * width * width * 4, model=model)
        log(run, 4, "same", 0, model=model)

    # LoRA-style: frozen base, rank-8 adapters on every layer, AdamW on the adapters only
    base = model
    for p in base.parameters():
        p.requires_grad_(False)
    lora = torch.nn.Sequential(*[LoRA(layer) for layer in base])
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(4, width)

    def train() -> None:
        lora(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    train()
    adapter = sum(p.numel() * 4 for p in lora.parameters() if p.requires_grad)
    with ct.init(project="bench-inc", name="lora", monitor=None) as run:
        log(run, 1, "lora first", full_tensor_bytes + 3 * adapter, model=lora, optimizer=opt)
        train()
        log(run, 2, "lora", 3 * adapter, model=lora, optimizer=opt)  # adapters + exp_avg + exp_avg_sq
    out.write_text(json.dumps({"full": full_tensor_bytes, "rows": rows}))


def _env(backend: str, work: Path) -> dict[str, str]:
    foreign = ("CKPT_TRACK_", "WANDB_", "COMET_", "CLEARML_", "TRAINS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
    env.update({
        "CKPT_TRACK_BACKEND": backend,
        "CKPT_TRACK_LOCAL__ROOT": str(work / "store"),
        "CKPT_TRACK_MLFLOW__TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "CKPT_TRACK_MLFLOW__ARTIFACT_LOCATION": str(work / "mlruns"),
        "CKPT_TRACK_WANDB__MODE": "offline", "CKPT_TRACK_WANDB__DIR": str(work / "wb"),
        "CKPT_TRACK_CLEARML__OFFLINE": "true",
        "CKPT_TRACK_COMET__ONLINE": "false", "CKPT_TRACK_COMET__WORKSPACE": "ws",
        "CKPT_TRACK_COMET__OFFLINE_DIRECTORY": str(work / "comet"),
        "HOME": str(work / "home"), "WANDB_DIR": str(work / "wb"), "WANDB_DATA_DIR": str(work / "wbdata"),
        "WANDB_CACHE_DIR": str(work / "wbcache"), "WANDB_CONFIG_DIR": str(work / "wbconfig"),
        "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true",
        "CLEARML_CONFIG_FILE": str(ROOT / "backends" / "clearml.conf"),
        "CLEARML_CACHE_DIR": str(work / "clearml-cache"),
        "COMET_DISABLE_AUTO_LOGGING": "1", "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_AUTO_LOG_ENV_DETAILS": "false", "COMET_AUTO_LOG_GIT_METADATA": "false",
        "COMET_AUTO_LOG_GIT_PATCH": "false", "COMET_AUTO_LOG_CODE": "false", "COMET_DISPLAY_SUMMARY_LEVEL": "0",
        "COMET_CONFIG": str(work / "no.comet.config"),
    })
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the dense model's weights")
    ap.add_argument("--backends", default="local,mlflow,wandb,clearml,comet")
    ap.add_argument("--child", nargs=3, metavar=("MIB", "OUT", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), Path(args.child[1]), Path(args.child[2]))
        return
    results: dict[str, dict] = {}
    for backend in args.backends.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ckpt-inc-{backend}-"))
        store = {"local": work / "store", "mlflow": work / "mlruns"}.get(backend, work / "none")
        out = work / "out.json"
        done = subprocess.run([sys.executable, __file__, "--child", str(args.mib), str(out), str(store)],
                              cwd=work, env=_env(backend, work), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{backend}: the benchmark child failed")
        results[backend] = json.loads(out.read_text())
        shutil.rmtree(work, ignore_errors=True)
        print(backend, results[backend])

    lines = []
    verdicts = []
    for backend, res in results.items():
        full = res["full"]
        for row in res["rows"]:
            case, sent, changed, disk = row["case"], row["sent"], row["changed"], row["disk"]
            if case in ("full", "lora first"):
                goal, ok = "(baseline)", True
            elif case == "same":
                goal, ok = "<= 1 MB", sent is not None and sent <= 1_000_000
            elif case == "lora":
                goal = "~ adapters + AdamW state"
                ok = sent is not None and sent <= changed + 0.01 * full
            else:
                goal = "<= f x full + 1%"
                ok = sent is not None and sent <= changed + 0.01 * full
            verdicts.append(ok)
            frac = "-" if sent is None else f"{sent / full:.4f}"
            disk_s = "-" if disk is None else f"{disk / 2**20:.2f} MiB"
            lines.append(f"| {backend} | {case} | {changed / 2**20:.2f} MiB | "
                         f"{'-' if sent is None else f'{sent / 2**20:.2f} MiB'} | {frac} | {disk_s} | {goal} | "
                         f"{'met' if ok else 'missed'} |")
    body = f"""## Incremental uploads, P5 (`benchmarks/bench_incremental.py`)

{machine()}
- Dense model: {LAYERS} fp32 weights, {args.mib} MiB in all ("full"); LoRA: the same base frozen, rank-8
  adapters on every layer, AdamW on the adapters. One process per backend, only `CKPT_TRACK_BACKEND` changed.
- "sent": bytes the backend handed to its tracker for that version (`Stored.uploaded`); "on disk": growth
  of the local store / MLflow artifact root (each file once). "changed": tensor bytes that changed.
- W&B: every artifact version lists all files; "sent" counts the files whose digest the previous version
  did not hold, which is what W&B uploads (it skips files it already has by digest).

| backend | version | changed | sent | sent / full | on disk | goal | |
|---|---|---:|---:|---:|---:|---|---|
{chr(10).join(lines)}

{sum(verdicts)} of {len(verdicts)} rows meet their goal.
"""
    write_section("bench_incremental", body)
    print(body)


if __name__ == "__main__":
    main()
