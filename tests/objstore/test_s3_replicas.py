"""``[storage] replicas``: copies in a second bucket and a directory follow the first copy in the
background; a failing replica is retried; restore takes the first copy that verifies and says
which; ``verify --all-copies`` checks each (against a real S3 server, SeaweedFS)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from typer.testing import CliRunner

import ckpt_track as ct
from ckpt_track.cli import app
from ckpt_track.format import is_blob, parse_manifest
from ckpt_track.objstore import ObjectStore


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _configure(monkeypatch, tmp_path: Path, first: str, replicas: list[str]) -> None:
    monkeypatch.setenv("CKPT_TRACK_BACKEND", "local")
    monkeypatch.setenv("CKPT_TRACK_LOCAL__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("CKPT_TRACK_STORAGE__URL", first)
    monkeypatch.setenv("CKPT_TRACK_STORAGE__REPLICAS", ",".join(replicas))


def _records(store: ObjectStore) -> list[str]:
    return sorted(p for p, _ in store.manifests())


def test_replicas_follow_and_restore_falls_back_to_a_healthy_copy(tmp_path: Path, s3_root: str, s3_server,
                                                                  monkeypatch, caplog) -> None:
    second, backup = f"{s3_root}-replica", f"file://{tmp_path / 'backup'}"
    _configure(monkeypatch, tmp_path, s3_root, [second, backup])
    model, opt = _model()
    with ct.init(project="p", name="r") as run:
        for step in (1, 2):
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
            run.log_checkpoint(step, model=model, optimizer=opt)
    stores = [ObjectStore(u) for u in (s3_root, second)] + [ObjectStore(backup)]
    names = [{p.rsplit("/", 1)[-1] for p in _records(s)} for s in stores]
    assert len(names[0]) == 2 and names[0] == names[1] == names[2]  # every copy holds both records
    for s in stores:
        assert s.referenced() == set(s.fs.find(s.path("objects")))  # ... and every object they name

    # the first copy rots: restore verifies, moves on to the replica and says so
    fs = s3_server.filesystem()
    manifest = parse_manifest(fs.cat_file(_records(stores[0])[-1]))
    entry = max((e for f, e in manifest.files.items() if is_blob(f)), key=lambda e: e.size)
    key = stores[0].object_path(entry)
    data = bytearray(fs.cat_file(key))
    data[3] ^= 0x10
    fs.pipe_file(key, bytes(data))
    fresh, _ = _model(seed=5)
    with caplog.at_level(logging.WARNING, logger="ckpt_track"):
        ct.restore(f"{run.ref}@latest", model=fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert any("restored from the replica" in r.message and second in r.message for r in caplog.records)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cold"))
    out = CliRunner().invoke(app, ["verify", f"{run.ref}@latest", "--all-copies", "--json"])
    assert out.exit_code == 4, out.output
    copies = json.loads(out.output)["copies"]
    assert [(c["url"], c["ok"]) for c in copies] == [(s3_root, False), (second, True), (backup, True)]


def test_a_failing_replica_is_retried_and_never_blocks_the_save(tmp_path: Path, s3_root: str, monkeypatch) -> None:
    blocked = tmp_path / "mnt"
    blocked.write_text("a file where the backup directory should be")  # the replica cannot be written
    backup = f"file://{blocked / 'backup'}"
    _configure(monkeypatch, tmp_path, s3_root, [backup])
    model, opt = _model()
    run = ct.init(project="p", name="late")
    stored = run.log_checkpoint(1, model=model, optimizer=opt).wait()
    assert stored is not None  # committed with the first copy
    notes = list((tmp_path / "store" / ".spool" / ".replicas").glob("*.json"))
    assert len(notes) == 1  # owed, noted on disk
    blocked.unlink()  # the backup disk is back
    run.finish()  # the last upload pass retries it
    assert not list((tmp_path / "store" / ".spool" / ".replicas").glob("*.json"))
    replica = ObjectStore(backup)
    assert len(_records(replica)) == 1
    assert replica.referenced() == set(replica.fs.find(replica.path("objects")))
