"""``ckpt-track refs``: every reference form, with an example per backend.

A bad reference gets one line (what is wrong, a did-you-mean); the whole list lives here, so
that line stays short.  The forms each backend accepts come from the backends themselves
(``ref_forms()`` through the registry); the examples below show one of each, pasted as a
user would.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..backends import registry
from ..refs import SELECTOR_WORDS
from .render import out_console

__all__ = ["EXAMPLES", "SELECTORS", "refs_command"]

_RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
_MODEL = "m-7a6b5c4d3e2f10293847566574839201"
_KEY = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
_TASK = "4a1b2c3d4e5f60718293a4b5c6d7e8f9"

#: What comes after the run: one selector at most.
SELECTORS = (
    ("(none)", "the run's latest checkpoint"),
    ("@latest", "the checkpoint holding the latest alias (the last one logged), else the highest step"),
    ("@best", "the best by the monitored metric ([retention] metric / monitor)"),
    ("@step=N", "the checkpoint logged at step N; if N was logged more than once, the last one logged"),
    ("@step-N", "the same, as the alias trackers show"),
    ("@<alias>", "an alias you gave (log_checkpoint(aliases=[...]))"),
    (":vN", "version N of the run's checkpoints, counting from v1 (ckpt-track ls lists them)"),
    ("?key=value", "a backend option for this reference only, e.g. ?root=/data/ckpts"),
)

#: One example of each form, per backend: (backend, example, what it is).
EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("local", "local://resnet/3k2j1x@best", "project / run id or name"),
    ("local", "local://resnet/3k2j1x@step=500?root=/data/ckpts", "a store elsewhere"),
    ("mlflow", f"mlflow://{_RUN}:v2", "run id"),
    ("mlflow", "mlflow://resnet/baseline-lr3e-4@latest", "experiment name / run name"),
    ("mlflow", f"runs:/{_RUN}/best", "MLflow run URI"),
    ("mlflow", f"models:/{_MODEL}", "a LoggedModel"),
    ("mlflow", "models:/resnet-ckpt/3   models:/resnet-ckpt@champion", "a registry version or alias"),
    ("mlflow", f"http://127.0.0.1:5000/#/experiments/1/runs/{_RUN}", "MLflow UI: run page"),
    ("mlflow", f"http://127.0.0.1:5000/#/experiments/1/models/{_MODEL}", "MLflow UI: logged model page"),
    ("mlflow", "http://127.0.0.1:5000/#/models/resnet-ckpt/versions/3", "MLflow UI: model version page"),
    ("mlflow", f"https://acme.cloud.databricks.com/ml/experiments/123/runs/{_RUN}",
     "Databricks (also .azuredatabricks.net, .gcp.databricks.com)"),
    ("mlflow", f"https://acme.cloud.databricks.com/?o=42#mlflow/experiments/123/runs/{_RUN}", "Databricks, older pages"),
    ("mlflow", "https://acme.cloud.databricks.com/explore/data/models/main/ml/resnet/version/3",
     "Databricks Unity Catalog model version"),
    ("wandb", "wandb://acme/resnet/3k2j1x@best", "entity / project / run id"),
    ("wandb", "acme/resnet/ckpt-3k2j1x:v0", "W&B artifact (W&B v0 is ckpt_track :v1)"),
    ("wandb", "wandb-artifact://acme/resnet/ckpt-3k2j1x:latest", "W&B SDK artifact URI"),
    ("wandb", "https://wandb.ai/acme/resnet/runs/3k2j1x", "W&B run page (also forge.coreweave.com/wandb/...)"),
    ("wandb", "https://acme.wandb.io/acme/resnet/artifacts/model/ckpt-3k2j1x/v3",
     "Dedicated Cloud or self-hosted: the host is kept as ?base_url="),
    ("clearml", f"clearml://{_TASK}@best", "task id (offline-<hex> for an offline session)"),
    ("clearml", "clearml://resnet/baseline@step=500", "project / task name or run id"),
    ("clearml", f"{_TASK}:v2", "a bare task id, as the UI's ID field shows it"),
    ("clearml", f"https://app.clear.ml/projects/*/experiments/{_TASK}/output/log",
     "ClearML UI task page (.../tasks/<id> on newer servers; any web host)"),
    ("clearml", f"https://clearml.example.com/projects/*/models/{_TASK}/general", "ClearML UI model page"),
    ("comet", f"comet://acme/resnet/{_KEY}@best", "workspace / project / experiment key or name"),
    ("comet", f"experiment://{_KEY}/ckpt-v3-step300", "Comet SDK model URI"),
    ("comet", "registry://acme/resnet-ckpt:2.0.0", "Comet registry model version"),
    ("comet", f"https://www.comet.com/acme/resnet/{_KEY}", "Comet experiment page (self-hosted: ?url= kept)"),
    ("comet", "https://www.comet.com/acme/model-registry/resnet-ckpt/2.0.0", "Comet model-registry page"),
)


def refs_command() -> None:
    """Every checkpoint reference form, with an example for each backend.

    Examples:

    \b
      ckpt-track refs
      ckpt-track refs | less -R
    """
    console = out_console()
    console.print(Text.assemble(("Checkpoint references", "bold"), ": <backend>://<run>[selector][?key=value], "
                                "or a tracker's own URI or web-UI URL pasted as is."))
    selectors = Table(title="selectors", title_justify="left", show_header=True, header_style="bold")
    selectors.add_column("selector", no_wrap=True)
    selectors.add_column("selects")
    for form, meaning in SELECTORS:
        selectors.add_row(Text(form), Text(meaning))
    console.print(selectors)
    examples = Table(title="examples", title_justify="left", show_header=True, header_style="bold")
    examples.add_column("backend", no_wrap=True)
    examples.add_column("reference", overflow="fold")
    examples.add_column("what it is")
    known = set(registry.names())
    for backend, example, meaning in EXAMPLES:
        if backend in known:
            examples.add_row(Text(backend), Text(example), Text(meaning))
    console.print(examples)
    plugins = [n for n in registry.names() if n not in {b for b, _, _ in EXAMPLES}]
    for name in plugins:  # third-party backends: the forms they declare
        for form in _forms(name):
            console.print(f"{name}: {form}", markup=False)
    console.print(f"A mistyped backend or selector ({', '.join('@' + w for w in SELECTOR_WORDS)}, @step=N, :vN) "
                  "is answered with a did-you-mean; an ambiguous self-hosted URL is matched by the servers "
                  "configured in ckpt_track.toml or the trackers' own variables (MLFLOW_TRACKING_URI, "
                  "WANDB_BASE_URL, COMET_URL_OVERRIDE, CLEARML_WEB_HOST), else write it as <backend>://...",
                  markup=False)


def _forms(name: str) -> tuple[str, ...]:
    try:
        cls = registry.get_class(name)
    except Exception:  # noqa: BLE001 - a broken plugin must not break the help
        return ()
    return tuple(getattr(cls, "ref_forms", lambda: ())())
