"""The contract every backend passes.

Subclass :class:`BackendContract` in a test module and provide the ``backend``
fixture (a fresh, empty backend instance) and ``settings_overrides`` (what
``ct.init(settings=...)`` needs to reach the same store)::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend({"root": str(tmp_path)})

        @pytest.fixture
        def settings_overrides(self, tmp_path):
            return {"backend": "mine", "mine": {"root": str(tmp_path)}}

Optional behaviour is switched by the backend's ``capabilities`` flags
(:class:`ckpt_track.Capability`), never by its name.  Per-backend data goes in fixtures:
``ui_refs`` (URLs pasted from the tracker's UI and the ``Ref`` each parses to),
``malformed_refs`` (near-misses that must be an ``InvalidRef``) and ``missing_run_ref``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from ..errors import CheckpointNotFound, ConfigError
from ..format import MANIFEST, LocalCheckpoint, verify, write_checkpoint
from ..policy import select
from ..protocol import Backend
from ..records import RunInfo, RunSpec
from ..refs import Ref, parse_ref
from ..state import capture
from ..writer import snapshot_tensors

__all__ = ["BackendContract", "blob_state", "make_blob_checkpoint", "make_checkpoint"]


def make_checkpoint(parent: Path, step: int, metrics: dict[str, float] | None = None, seed: int = 0) -> LocalCheckpoint:
    """A small real checkpoint (a Linear model, an optimizer) committed under ``parent``."""
    torch.manual_seed(seed + step)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    c = capture(step=step, model=model, optimizer=opt, extra={"seed": seed})
    return write_checkpoint(parent, f"ckpt-{step}-{uuid.uuid4().hex[:6]}", snapshot_tensors(c.tensors, copy=True),
                            c.tree, step=step, metrics=metrics or {}, lineage={"test": True})


def make_blob_checkpoint(parent: Path, step: int, tensors: dict[str, torch.Tensor]) -> LocalCheckpoint:
    """A checkpoint of ``tensors`` in the incremental layout (one content-addressed file per
    tensor of 64 KiB or more)."""
    return write_checkpoint(parent, f"blob-{step}-{uuid.uuid4().hex[:6]}", tensors, {"step": step},
                            step=step, blobs=True, pack_size=64 * 1024)


def blob_state(seed: int, changed: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Four 128 KiB tensors and a small one; the ``changed`` ones get other values."""
    g = torch.Generator().manual_seed(seed)
    out = {f"w{i}": torch.randn(32768, generator=g) for i in range(4)}
    out["bias"] = torch.randn(16, generator=g)
    for name in changed:
        out[name] = out[name] + 1.0
    return out


def _tensor_file_size(ckpt: LocalCheckpoint, name: str) -> int:
    from safetensors import safe_open

    for fname, entry in ckpt.manifest.files.items():
        if fname.endswith(".safetensors"):
            with safe_open(str(ckpt.path / fname), framework="pt") as f:
                if name in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return entry.size
    raise KeyError(name)


def _bytes(ckpt: LocalCheckpoint) -> dict[str, bytes]:
    return {name: (ckpt.path / name).read_bytes() for name in [*ckpt.manifest.files, MANIFEST]}


class BackendContract:
    """Shared tests; subclasses provide the ``backend`` and ``settings_overrides`` fixtures."""

    @pytest.fixture
    def backend(self) -> Backend:  # pragma: no cover - overridden
        raise NotImplementedError("subclass BackendContract and provide a 'backend' fixture")

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError("subclass BackendContract and provide a 'settings_overrides' fixture")

    @pytest.fixture
    def project(self) -> str:
        """A project of its own per test, so backends with shared servers stay isolated."""
        return f"contract-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def run(self, backend: Backend, project: str) -> RunInfo:
        return backend.open_run(RunSpec(project=project, name="run-a", config={"lr": 0.1}))

    @pytest.fixture
    def missing_run_ref(self, run: RunInfo) -> Ref:
        """A well-formed reference to a run that does not exist; override where the shape differs."""
        *head, last = run.ref.segments
        fake = "0" * len(last) if last.isalnum() else "nosuchrun"
        return Ref(run.ref.backend, "/".join([*head, fake]), params=run.ref.params)

    @pytest.fixture
    def spool(self, tmp_path: Path) -> Path:
        return tmp_path / "spool"

    @pytest.fixture
    def ui_refs(self) -> list[tuple[str, Ref]]:
        """Per-backend data: text pasted from the tracker's web UI (or its SDK's own reference
        forms) and the ``Ref`` it must parse to; empty for a tracker without a UI."""
        return []

    # -- runs ------------------------------------------------------------------------
    def test_open_run_creates_then_attaches(self, backend: Backend, project: str) -> None:
        first = backend.open_run(RunSpec(project=project, name="first"))
        assert not first.resumed and first.name == "first"
        again = backend.open_run(RunSpec(project=project, run_id=first.run_id, resume="auto"))
        assert again.resumed and again.run_id == first.run_id and again.ref == first.ref
        if "choose_run_id" in backend.capabilities:
            fixed = backend.open_run(RunSpec(project=project, run_id="fixed01"))
            assert not fixed.resumed and fixed.run_id == "fixed01"

    def test_resume_modes(self, backend: Backend, project: str) -> None:
        existing = backend.open_run(RunSpec(project=project, name="existing"))
        with pytest.raises(ConfigError):
            backend.open_run(RunSpec(project=project, run_id=existing.run_id, resume="never"))
        fresh = backend.open_run(RunSpec(project=project, name="existing", resume="never"))
        assert fresh.run_id != existing.run_id and not fresh.resumed
        with pytest.raises(CheckpointNotFound):
            backend.open_run(RunSpec(project=project, name="absent-run", resume="must"))

    def test_attach_by_name(self, backend: Backend, run: RunInfo, project: str) -> None:
        again = backend.open_run(RunSpec(project=project, name="run-a"))
        assert again.resumed and again.run_id == run.run_id

    def test_find_run(self, backend: Backend, run: RunInfo, missing_run_ref: Ref) -> None:
        assert backend.find_run(run.ref).run_id == run.run_id
        with pytest.raises(CheckpointNotFound):
            backend.find_run(missing_run_ref)

    # -- checkpoints ---------------------------------------------------------------------
    def test_put_get_round_trip_bytes_identical(self, backend: Backend, run: RunInfo, spool: Path, tmp_path: Path) -> None:
        ckpt = make_checkpoint(spool, step=10, metrics={"val/loss": 1.5})
        stored = backend.put(run, ckpt, ["latest", "step-10"])
        assert stored.step == 10 and stored.version == 1
        assert stored.metrics == {"val/loss": 1.5}
        assert set(stored.aliases) == {"latest", "step-10"}
        got = backend.get(stored, tmp_path / "dl")
        verify(got.path)
        assert _bytes(got) == _bytes(ckpt)

    def test_versions_and_list_order(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        for step in (5, 10, 10, 20):
            backend.put(run, make_checkpoint(spool, step), [f"step-{step}"])
        listed = backend.list(run)
        assert [s.version for s in listed] == [1, 2, 3, 4]
        assert [s.step for s in listed] == [5, 10, 10, 20]
        assert "step-10" in listed[2].aliases and "step-10" not in listed[1].aliases  # moved to the newest

    def test_set_aliases_moves(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        a = backend.put(run, make_checkpoint(spool, 1), ["best"])
        b = backend.put(run, make_checkpoint(spool, 2), [])
        backend.set_aliases(b, ["best", "mine"])
        by_version = {s.version: s for s in backend.list(run)}
        assert "best" not in by_version[a.version].aliases
        assert {"best", "mine"} <= set(by_version[b.version].aliases)

    def test_selectors(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        backend.put(run, make_checkpoint(spool, 1), ["step-1"])
        backend.put(run, make_checkpoint(spool, 2), ["step-2", "best"])
        backend.put(run, make_checkpoint(spool, 3), ["step-3", "latest"])
        listed = backend.list(run)
        assert select(listed, run.ref.select(alias="latest")).step == 3
        assert select(listed, run.ref.select(alias="best")).step == 2
        assert select(listed, run.ref.select(step=1)).step == 1
        assert select(listed, run.ref.select(alias="step-2")).step == 2
        assert select(listed, run.ref.select(version=1)).step == 1
        with pytest.raises(CheckpointNotFound, match="available steps: 1, 2, 3"):
            select(listed, run.ref.select(step=99))

    def test_delete(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        if "delete" not in backend.capabilities:
            pytest.skip("backend cannot delete")
        a = backend.put(run, make_checkpoint(spool, 1), ["step-1", "keepme"])
        b = backend.put(run, make_checkpoint(spool, 2), ["step-2"])
        backend.delete(a)
        listed = backend.list(run)
        assert [s.version for s in listed] == [b.version]
        assert all("keepme" not in s.aliases for s in listed)
        c = backend.put(run, make_checkpoint(spool, 3), [])
        assert c.version > b.version  # versions are never reused
        backend.delete(c)  # not even the newest one's
        d = backend.put(run, make_checkpoint(spool, 4), [])
        assert d.version > c.version

    def test_link_input_and_finish_run(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        source = backend.put(run, make_checkpoint(spool, 7), ["step-7"])
        other = backend.open_run(RunSpec(project=run.project, name="run-b"))
        backend.link_input(other, source)  # lineage inside the tracker; must not fail
        backend.finish_run(other)
        assert [s.step for s in backend.list(run)] == [7]

    def test_empty_run_lists_nothing(self, backend: Backend, run: RunInfo) -> None:
        assert backend.list(run) == []
        with pytest.raises(CheckpointNotFound, match="no committed checkpoints"):
            select([], run.ref)

    def test_stored_ref_round_trips(self, backend: Backend, run: RunInfo, spool: Path) -> None:
        stored = backend.put(run, make_checkpoint(spool, 4), [])
        assert parse_ref(str(stored.ref)) == stored.ref
        assert parse_ref(str(run.ref)) == run.ref

    @pytest.fixture
    def malformed_refs(self) -> list[str]:
        """Per-backend data: near-misses of this backend's reference forms, each an InvalidRef."""
        return []

    def test_malformed_refs_are_invalid(self, malformed_refs: list[str]) -> None:
        from ..errors import InvalidRef

        if not malformed_refs:
            pytest.skip("no malformed reference forms given for this backend")
        for text in malformed_refs:
            with pytest.raises(InvalidRef):
                parse_ref(text)

    def test_ui_refs_parse(self, backend: Backend, ui_refs: list[tuple[str, Ref]]) -> None:
        if not ui_refs:
            pytest.skip("no web-UI reference forms given for this backend")
        for text, want in ui_refs:
            assert type(backend).parse_ref(text) == want, text
            assert parse_ref(text) == want, text  # also through the registry, as users paste it
            assert parse_ref(str(want)) == want

    # -- incremental (content-addressed tensor files) ---------------------------------------
    def test_dedup_sends_only_changed_files(self, backend: Backend, run: RunInfo, spool: Path,
                                            tmp_path: Path) -> None:
        if "dedup" not in backend.capabilities:
            pytest.skip("backend stores every file of every version")
        a = make_blob_checkpoint(spool, 1, blob_state(0))
        first = backend.put(run, a, [])
        assert first.uploaded is not None and first.uploaded >= 4 * 128 * 1024
        b = make_blob_checkpoint(spool, 2, blob_state(0, changed=("w1",)))
        second = backend.put(run, b, [])
        small = b.manifest.files["state.json"].size + (b.path / MANIFEST).stat().st_size + 4096
        changed = _tensor_file_size(b, "w1") + _tensor_file_size(b, "bias")
        assert second.uploaded is not None and second.uploaded <= changed + small, second.uploaded
        c = make_blob_checkpoint(spool, 3, blob_state(0, changed=("w1",)))  # nothing changed
        third = backend.put(run, c, [])
        assert third.uploaded is not None and third.uploaded <= min(small, 1_000_000), third.uploaded
        for stored, src in ((second, b), (third, c)):
            got = backend.get(stored, tmp_path / f"dl-{stored.version}")
            verify(got.path)
            assert _bytes(got) == _bytes(src)

    def test_dedup_restorable_after_predecessors_deleted(self, backend: Backend, run: RunInfo, spool: Path,
                                                         tmp_path: Path) -> None:
        if not {"dedup", "delete"} <= backend.capabilities:
            pytest.skip("backend cannot delete or does not deduplicate")
        a = backend.put(run, make_blob_checkpoint(spool, 1, blob_state(3)), [])
        b_src = make_blob_checkpoint(spool, 2, blob_state(3, changed=("w0",)))
        b = backend.put(run, b_src, [])
        c_src = make_blob_checkpoint(spool, 3, blob_state(3, changed=("w0", "w2")))
        c = backend.put(run, c_src, [])
        backend.delete(a)  # b and c still need a's w1, w2, w3 (b) and w1, w3 (c)
        got = backend.get(b, tmp_path / "dl-b")
        verify(got.path)
        assert _bytes(got) == _bytes(b_src)
        backend.delete(b)
        got = backend.get(c, tmp_path / "dl-c")
        verify(got.path)
        assert _bytes(got) == _bytes(c_src)
        assert [s.version for s in backend.list(run)] == [c.version]

    # -- through the public API ----------------------------------------------------------
    def test_log_and_restore_through_api(self, settings_overrides: dict[str, Any]) -> None:
        import ckpt_track as ct

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        with ct.init(project=f"contract-api-{uuid.uuid4().hex[:6]}", name="api", settings=settings_overrides) as run:
            for step, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
                with torch.no_grad():
                    model.weight.add_(1.0)
                run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
        fresh = torch.nn.Linear(4, 2)
        settings = ct.load_settings(settings_overrides)
        best = ct.restore(run.ref.select(alias="best"), model=fresh, settings=settings)
        assert best.step == 2 and best.metrics == {"val/loss": 0.5}
        latest = ct.restore(run.ref, model=fresh, settings=settings)
        assert latest.step == 3 and torch.equal(fresh.weight, model.weight)
