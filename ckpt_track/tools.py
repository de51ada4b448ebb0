"""Working tools on stored checkpoints: lineage, diff, gc, copy and average.

These are the library functions behind ``ckpt-track lineage / diff / gc / copy /
average``; each works on any backend through the Protocol only::

    from ckpt_track import tools
    tools.lineage("local://resnet/run-b@latest")          # [LineageNode, ...] back to the root
    tools.diff("local://resnet/r:v3", "local://resnet/r:v4").changed_tensors
    tools.gc("mlflow://<run_id>", keep_last=3, keep_best=1, metric="val/loss", dry_run=True).planned
    tools.copy("mlflow://<run_id>", "local://resnet/mirror")
    tools.average(["local://p/r:v3", "local://p/r:v4", "local://p/r:v5"], "./swa")

Copy targets (``to=`` of :func:`copy`, a reference output of :func:`average`)::

    <backend>://<run ref>           an existing run, e.g. mlflow://<run_id>, local://proj/3k2j1x
    <backend>://<project>/<name>    the run with that name (or, where the backend lets us
                                    choose ids, that id) in that project, created if missing;
                                    for MLflow the project is the experiment
    ...?key=value                   backend options for the target, e.g. ?tracking_uri=http://host:5000,
                                    ?root=/data/ckpts (local), ?entity=acme (W&B)

Nothing here unpickles: tensors are read with safetensors, the rest is JSON.

The operations live in ``ckpt_track.ops`` (one module each); this module is their flat
public API and stays importable as it always was.
"""

from __future__ import annotations

from .ops.average import AverageResult, average
from .ops.copy import CopyResult, copy, open_target
from .ops.diff import CheckpointDiff, MetricDelta, TensorDelta, diff
from .ops.gc import GcResult, ObjectGcResult, gc, gc_objects
from .ops.lineage import LineageNode, lineage

__all__ = [
    "AverageResult",
    "CheckpointDiff",
    "CopyResult",
    "GcResult",
    "LineageNode",
    "MetricDelta",
    "ObjectGcResult",
    "TensorDelta",
    "average",
    "copy",
    "diff",
    "gc",
    "gc_objects",
    "lineage",
    "open_target",
]
