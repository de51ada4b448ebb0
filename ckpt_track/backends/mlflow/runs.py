"""Finding MLflow runs by name and listing what a tracking server holds: the lookups behind
``mlflow://<experiment>/<run name>`` and the ``ckpt-track runs`` / ``projects`` verbs.

A run name is not unique in MLflow.  ``mlflow://<experiment>/<run name>`` means the newest
run of that name (the one ``ct.init(name=...)`` attaches to), with a warning naming the
others' ids when there are several: ``mlflow://<run_id>`` picks one of them exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from ...errors import CheckpointNotFound

__all__ = ["CKPT_TAG", "ckpt_runs", "experiment", "experiment_names", "newest_named"]

CKPT_TAG = "ckpt_track"  # run tag set on every run ckpt_track creates


def _quoted(value: str) -> str:
    """A value inside a search filter's single quotes."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def experiment_names(client: Any) -> list[str]:
    """Every active experiment the server lists, by name."""
    names: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        names += [e.name for e in page]
        token = page.token
        if not token:
            return sorted(names)


def experiment(client: Any, name: str, where: str) -> Any:
    """The experiment called ``name``; ``CheckpointNotFound`` listing the known ones if none."""
    exp = client.get_experiment_by_name(name)
    if exp is None or getattr(exp, "lifecycle_stage", "active") != "active":
        known = experiment_names(client)
        raise CheckpointNotFound(
            f"no MLflow experiment {name!r} at {where}; experiments there: {', '.join(known) or 'none'}"
        )
    return exp


def _search(client: Any, exp_id: str, filter_string: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, order_by=["attributes.start_time DESC"],
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def newest_named(client: Any, exp: Any, run_name: str, where: str) -> Any:
    """The newest run called ``run_name`` in ``exp``; a warning names the others, if any."""
    found = list(_search(client, exp.experiment_id, f"tags.mlflow.runName = '{_quoted(run_name)}'"))
    if not found:
        raise CheckpointNotFound(
            f"no MLflow run named {run_name!r} in experiment {exp.name!r} at {where}; "
            f"list them with `ckpt-track runs mlflow://{exp.name}`"
        )
    if len(found) > 1:
        others = ", ".join(r.info.run_id for r in found[1:6]) + (" ..." if len(found) > 6 else "")
        warnings.warn(
            f"mlflow://{exp.name}/{run_name}: {len(found)} runs have that name; using the newest, "
            f"{found[0].info.run_id} (others: {others}); write mlflow://<run_id> to pick another",
            UserWarning, stacklevel=4,
        )
    return found[0]


def ckpt_runs(client: Any, exp: Any) -> list[Any]:
    """The runs of ``exp`` that ckpt_track created (tag ``ckpt_track``), newest first."""
    return list(_search(client, exp.experiment_id, f"tags.{CKPT_TAG} = 'true'"))
