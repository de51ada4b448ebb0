"""``lineage``, ``diff``, ``gc``, ``copy`` and ``average``: through the CLI and through ``ckpt_track.tools``,
against real local stores and a real MLflow server."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error
from mlflow_server import MlflowServer
from typer.testing import CliRunner, Result

import ckpt_track as ct
from ckpt_track import tools
from ckpt_track.backends.local import LocalBackend
from ckpt_track.cli import app
from ckpt_track.format import MANIFEST, hash_file, load_checkpoint
from ckpt_track.refs import parse_ref
from ckpt_track.resolve import resolve
from ckpt_track.state import apply


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def ok_json(*args: str) -> object:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


failed = assert_cli_error


class Net(torch.nn.Module):
    """Float32 weights, a float16 buffer and an integer buffer: every dtype rule of averaging."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 2)
        self.register_buffer("scale", torch.rand(5).half())
        self.register_buffer("index", torch.arange(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) * self.scale.float()))


def train(run: ct.Run, model: Net, opt: torch.optim.Optimizer, losses: dict[int, float],
          aliases: dict[int, list[str]] | None = None) -> None:
    """One optimizer step per checkpoint, so each holds other weights."""
    for step, loss in losses.items():
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": loss},
                           aliases=(aliases or {}).get(step, ()), epoch=step // 20, blocking=True)


def two_runs(settings: dict[str, object], project: str) -> tuple[ct.Run, ct.Run]:
    """Run ``a`` (steps 10, 20, 30), and run ``b`` resumed from ``a@step=20`` (steps 30, 40)."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ct.init(project=project, name="a", settings=settings) as a:
        train(a, model, opt, {10: 0.9, 20: 0.4, 30: 0.6}, aliases={10: ["warm"]})
    model = Net(seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ct.init(project=project, name="b", settings=settings) as b:
        assert b.resume(model=model, optimizer=opt, ref=f"{a.ref}@step=20") == 21
        train(b, model, opt, {30: 0.5, 40: 0.3})
    return a, b


def file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hash_file(p) for p in sorted(path.iterdir())}


def fetched_hashes(ref: str) -> dict[str, str]:
    return file_hashes(resolve(ref).fetch().path)


def assert_same_versions(src: Sequence[ct.Stored], dst: Sequence[ct.Stored]) -> None:
    """Steps, epochs, metrics, aliases, lineage edges and every file's bytes are equal."""
    assert [s.step for s in src] == [d.step for d in dst]
    for s, d in zip(src, dst):
        assert (s.epoch, dict(s.metrics), set(s.aliases)) == (d.epoch, dict(d.metrics), set(d.aliases))
        for edge in ("run", "parent", "resumed_from"):
            assert (s.lineage.get(edge) or None) == (d.lineage.get(edge) or None), edge
        assert fetched_hashes(str(s.ref)) == fetched_hashes(str(d.ref))


# --------------------------------------------------------------------------- copy


def test_copy_mlflow_to_local_and_back_keeps_everything(mlflow_env: MlflowServer, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("CKPT_TRACK_MLFLOW__TRACKING_URI", mlflow_env.uri)
    experiment = f"tools-{uuid.uuid4().hex[:8]}"
    a, b = two_runs({"backend": "mlflow"}, experiment)
    orig_a, orig_b = ct.list_checkpoints(a.ref), ct.list_checkpoints(b.ref)
    assert "warm" in orig_a[0].aliases and "best" in orig_a[1].aliases
    assert orig_b[0].lineage["resumed_from"] == str(orig_a[1].ref)

    # MLflow -> local: the CLI for run a, the library for run b
    out = ok_json("copy", str(a.ref), "--to", "local://mirror/a")
    assert out["target"] == "local://mirror/a"
    assert [(r["step"], r["status"]) for r in out["copied"]] == [(10, "copied"), (20, "copied"), (30, "copied")]
    copied_b = tools.copy(b.ref, "local://mirror/b")
    assert [(s.step, d.ref.backend) for s, d in copied_b.copied] == [(30, "local"), (40, "local")]
    mirror_a, mirror_b = ct.list_checkpoints("local://mirror/a"), ct.list_checkpoints("local://mirror/b")
    assert_same_versions(orig_a, mirror_a)
    assert_same_versions(orig_b, mirror_b)

    # ... and back into a new MLflow run, named in a new experiment
    back = ok_json("copy", "local://mirror/b", "--to", f"mlflow://{experiment}-back/b-back")
    back_ref = back["target"]
    assert parse_ref(back_ref).backend == "mlflow"
    back_b = ct.list_checkpoints(back_ref)
    assert_same_versions(mirror_b, back_b)
    assert_same_versions(orig_b, back_b)

    # restores from the copy of the copy are byte-identical to the original
    for original, twin in zip(orig_b, back_b):
        first, second = tmp_path / f"orig-{original.step}", tmp_path / f"copy-{twin.step}"
        assert invoke("restore", str(original.ref), "-o", str(first)).exit_code == 0
        assert invoke("restore", str(twin.ref), "-o", str(second)).exit_code == 0
        assert file_hashes(first) == file_hashes(second) and MANIFEST in file_hashes(first)
        m1, m2 = Net(seed=1), Net(seed=2)
        ct.restore(original.ref, model=m1)
        ct.restore(twin.ref, model=m2)
        assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))

    # lineage of the copy walks back through the original runs, across backends
    chain = ok_json("lineage", "local://mirror/b")
    assert [(n["backend"], n["step"]) for n in chain] == [("local", 40), ("mlflow", 30), ("mlflow", 20),
                                                          ("mlflow", 10)]
    assert chain[0]["logged_by"] == str(b.ref) and chain[1]["via"] == "resumed_from"

    # copying again finds everything already there; one checkpoint by selector keeps its aliases
    again = tools.copy(b.ref, "local://mirror/b")
    assert not again.copied and [s.step for s, _ in again.skipped] == [30, 40]
    assert len(ct.list_checkpoints("local://mirror/b")) == 2
    single = tools.copy(f"{a.ref}@best", "local://mirror/best-only")
    assert [(d.step, set(d.aliases)) for _, d in single.copied] == [(20, {"best", "step-20"})]

    # remote retention through the Protocol: gc on the MLflow copy
    plan = ok_json("gc", back_ref, "--keep-last", "1", "--dry-run")
    assert [r["step"] for r in plan["delete"]] == [30] and plan["deleted"] == []
    assert len(ct.list_checkpoints(back_ref)) == 2
    done = tools.gc(back_ref, keep_last=1)
    assert [s.step for s in done.deleted] == [30]
    assert [s.step for s in ct.list_checkpoints(back_ref)] == [40]


def test_copy_target_errors() -> None:
    with ct.init(project="p", name="src") as run:
        run.log_checkpoint(1, model=Net(), blocking=True)
    failed(invoke("copy", str(run.ref), "--to", "local://p/dst@best"), 2)  # a checkpoint, not a run
    failed(invoke("copy", str(run.ref), "--to", "local://only-one-segment"), 2)
    failed(invoke("copy", "local://p/nosuchrun", "--to", "local://p/dst"), 3)
    failed(invoke("copy", str(run.ref), "--to", "nosuch://p/dst"), 2)


# --------------------------------------------------------------------------- lineage


def test_lineage_across_a_resume_from_another_run() -> None:
    a, b = two_runs({}, "p")
    chain = tools.lineage(f"{b.ref}@latest")
    assert [(n.stored.run.name, n.stored.step) for n in chain if n.stored] == [("b", 40), ("b", 30), ("a", 20),
                                                                               ("a", 10)]
    assert [n.via for n in chain] == ["parent", "resumed_from", "parent", None]
    assert chain[1].resumed_from == chain[2].ref == f"{a.ref}:v2"

    result = invoke("lineage", str(b.ref))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"run {a.ref} (a)" in out and f"run {b.ref} (b)" in out
    assert f"resumed from {a.ref}:v2" in out and "(root)" in out
    assert out.index(f"run {b.ref}") < out.index(f"run {a.ref}")
    assert [n["ref"] for n in ok_json("lineage", str(b.ref))] == [n.ref for n in chain]

    # a parent deleted since ends the chain with a missing node instead of failing
    first = ct.list_checkpoints(a.ref)[0]
    LocalBackend().delete(first)
    chain = tools.lineage(b.ref)
    assert chain[-1].stored is None and chain[-1].ref == f"{a.ref}@step=10" and "no checkpoint" in chain[-1].error
    assert "missing" in invoke("lineage", str(b.ref)).stdout
    failed(invoke("lineage", f"{a.ref}@step=999"), 3)


# --------------------------------------------------------------------------- diff


@pytest.fixture
def diffed() -> tuple[ct.Run, Net, Net]:
    """v1 with optimizer state, v2 without, only fc1.weight changed in between."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    with ct.init(project="p", name="d") as run:
        run.log_checkpoint(1, model=model, optimizer=opt, metrics={"val/loss": 0.8, "acc": 0.5}, blocking=True)
        before = copy.deepcopy(model)  # not Net(): that would reseed and so change the saved RNG state
        with torch.no_grad():
            model.fc1.weight[0, 0] += 0.25
            model.fc1.weight[1] *= 2
        run.log_checkpoint(2, model=model, metrics={"val/loss": 0.6}, blocking=True)
    return run, before, model


def test_diff_of_a_checkpoint_with_itself_reports_no_change(diffed: tuple[ct.Run, Net, Net]) -> None:
    run, _, _ = diffed
    d = tools.diff(f"{run.ref}:v1", f"{run.ref}@step=1")
    assert not d.changed and not d.changed_tensors and d.state_keys == ()
    assert {t.status for t in d.tensors} == {"unchanged"} and len(d.tensors) > 6
    assert [(m.name, m.delta) for m in d.metrics] == [("acc", 0.0), ("val/loss", 0.0)]
    out = invoke("diff", f"{run.ref}:v1", f"{run.ref}:v1")
    assert out.exit_code == 0 and "no differences" in out.stdout
    assert ok_json("diff", f"{run.ref}:v2", f"{run.ref}:v2")["changed"] is False


def test_diff_reports_changed_tensors_and_metric_deltas(diffed: tuple[ct.Run, Net, Net]) -> None:
    run, before, after = diffed
    d = tools.diff(f"{run.ref}:v1", f"{run.ref}:v2")
    assert d.changed
    by_name = {t.name: t for t in d.tensors}
    assert [t.name for t in d.tensors if t.status == "changed"] == ["model/fc1.weight"]
    assert by_name["model/fc1.bias"].status == by_name["model/index"].status == "unchanged"
    assert {t.name for t in d.tensors if t.status == "only_a"} == {n for n in by_name if n.startswith("optimizer/")}
    a, b = before.fc1.weight.detach().double(), after.fc1.weight.detach().double()
    w = by_name["model/fc1.weight"]
    assert w.max_abs == pytest.approx(float((b - a).abs().max()), rel=1e-12)
    assert w.rel_l2 == pytest.approx(float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a)), rel=1e-12)
    metrics = {m.name: m for m in d.metrics}
    assert metrics["val/loss"].delta == pytest.approx(-0.2) and metrics["acc"].b is None
    assert set(d.state_keys) == {"optimizer", "step"}

    data = ok_json("diff", f"{run.ref}:v1", f"{run.ref}:v2", "--prefix", "model/")
    assert data["changed"] is True and data["counts"]["only_a"] == 0
    assert [t["name"] for t in data["tensors"] if t["status"] != "unchanged"] == ["model/fc1.weight"]
    table = invoke("diff", f"{run.ref}:v1", f"{run.ref}:v2").stdout
    assert "model/fc1.weight" in table and "only in A" in table and "-0.2" in table
    assert "model/fc1.bias" not in table and "differs in optimizer, step" in table
    assert "model/fc1.bias" in invoke("diff", f"{run.ref}:v1", f"{run.ref}:v2", "--all").stdout


# --------------------------------------------------------------------------- gc


def test_gc_dry_run_lists_then_gc_deletes_exactly_that() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = {10: 0.9, 20: 0.3, 30: 0.8, 40: 0.7, 50: 0.6, 60: 0.5}
    with ct.init(project="p", name="g") as run:
        train(run, model, opt, losses, aliases={10: ["keep-me"]})
    args = ("gc", str(run.ref), "--keep-last", "2", "--keep-best", "1", "--metric", "val/loss")

    preview = ok_json(*args, "--dry-run")
    assert preview["dry_run"] is True and preview["deleted"] == []
    assert [r["step"] for r in preview["delete"]] == [30, 40]
    assert [r["step"] for r in preview["keep"]] == [10, 20, 50, 60]
    assert len(ct.list_checkpoints(run.ref)) == 6
    table = invoke(*args, "--dry-run").stdout
    assert "would delete" in table and "dry run: would delete 2 of 6" in table

    done = ok_json(*args)
    assert [r["ref"] for r in done["deleted"]] == [r["ref"] for r in preview["delete"]]
    left = ct.list_checkpoints(run.ref)
    assert [s.step for s in left] == [10, 20, 50, 60]
    assert "keep-me" in left[0].aliases and "best" in left[1].aliases and "latest" in left[-1].aliases
    assert "nothing to delete" in invoke(*args).stdout

    # a misspelt metric would protect nothing: refused; so is gc without any rule
    assert "val/loss" in failed(invoke("gc", str(run.ref), "--keep-best", "1", "--metric", "val/los"), 2)
    failed(invoke("gc", str(run.ref)), 2)
    failed(invoke("gc", str(run.ref), "--keep-last", "0"), 2)
    failed(invoke("gc", str(run.ref), "--keep-last", "1", "--mode", "up"), 2)


# --------------------------------------------------------------------------- average


Three = tuple[ct.Run, list[dict[str, torch.Tensor]]]


@pytest.fixture
def three() -> Three:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # optimizer state must stay out
    snapshots = []
    with ct.init(project="p", name="avg-src") as run:
        for step in (10, 20, 30):
            model(torch.randn(3, 6)).sum().backward()
            opt.step()
            with torch.no_grad():
                model.scale.mul_(1.5)
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            run.log_checkpoint(step, model=model, optimizer=opt, metrics={"val/loss": 1.0 / step}, blocking=True)
    return run, snapshots


def test_average_of_three_checkpoints_is_the_elementwise_mean(three: Three, tmp_path: Path) -> None:
    run, snaps = three
    refs = [f"{run.ref}:v{v}" for v in (1, 2, 3)]
    out = ok_json("average", *refs, "-o", str(tmp_path / "avg"))
    assert out["step"] == 30 and out["taken_from_first"] == ["model/index"]
    manifest, tensors, state = load_checkpoint(tmp_path / "avg")
    for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "scale"):
        expected = torch.stack([s[key].double() for s in snaps]).mean(0).to(snaps[0][key].dtype)
        assert tensors[f"model/{key}"].dtype == snaps[0][key].dtype
        assert torch.equal(tensors[f"model/{key}"], expected), key
    assert torch.equal(tensors["model/index"], snaps[0]["index"])
    assert not any(n.startswith("optimizer/") for n in tensors) and "rng" not in state
    assert manifest.step == 30 and manifest.metrics == {}
    assert manifest.lineage["averaged_from"] == refs and manifest.lineage["parent"] == refs[2]
    model = Net(seed=3)
    apply(state, tensors, model=model)
    assert torch.equal(model.fc2.bias, tensors["model/fc2.bias"])

    # logged into a new run it is that run's latest; into an existing one it moves only the given aliases
    result = tools.average(refs, "local://p/swa")
    assert result.stored is not None and set(result.stored.aliases) == {"latest", "step-30"}
    model = Net(seed=4)
    assert ct.restore("local://p/swa", model=model).step == 30
    assert torch.equal(model.fc1.weight, tensors["model/fc1.weight"])
    ok_json("average", *refs[:2], "-o", "local://p/swa", "--alias", "swa-12")
    swa = ct.list_checkpoints("local://p/swa")
    assert [set(s.aliases) for s in swa] == [{"latest", "step-30"}, {"swa-12"}]
    # lineage goes on through the newest source (step 20 of avg-src) to its root
    assert [n.stored.step for n in tools.lineage("local://p/swa@swa-12") if n.stored] == [20, 20, 10]
    assert "average of" in invoke("lineage", "local://p/swa@swa-12").stdout


def test_average_refuses_what_it_cannot_average(three: Three, tmp_path: Path) -> None:
    run, snaps = three
    refs = [f"{run.ref}:v{v}" for v in (1, 2, 3)]
    failed(invoke("average", refs[0], "-o", str(tmp_path / "one")), 2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    failed(invoke("average", *refs, "-o", str(tmp_path / "full")), 2)
    failed(invoke("average", *refs, "-o", str(tmp_path / "o"), "--non-float", "mean"), 2)

    other = Net()
    other.index += 1  # an integer buffer that differs cannot be averaged ...
    with ct.init(project="p", name="odd") as odd:
        odd.log_checkpoint(40, model=other, blocking=True)
    assert "model/index" in failed(invoke("average", refs[0], f"{odd.ref}:v1", "-o", str(tmp_path / "x")), 1)
    # ... unless taken from the first on request
    out = ok_json("average", refs[0], f"{odd.ref}:v1", "-o", str(tmp_path / "y"), "--non-float", "first")
    assert out["taken_from_first"] == ["model/index"]
    assert torch.equal(load_checkpoint(tmp_path / "y")[1]["model/index"], snaps[0]["index"])

    with ct.init(project="p", name="small") as small:
        small.log_checkpoint(1, model=torch.nn.Linear(6, 5), blocking=True)
    assert "fc1.weight" in failed(invoke("average", refs[0], f"{small.ref}:v1", "-o", str(tmp_path / "z")), 1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_help_of_each_tool_has_an_example() -> None:
    for command in ("lineage", "diff", "gc", "copy", "average"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.stdout and f"    ckpt-track {command}" in result.stdout
