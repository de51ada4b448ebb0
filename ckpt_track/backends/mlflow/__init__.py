"""The ``mlflow`` backend: each checkpoint is an MLflow 3 LoggedModel of its run.

What the MLflow UI shows for a checkpoint logged here:

- a LoggedModel (``model_type="checkpoint"``) linked to the run as an output at its
  ``step``, holding ``manifest.json``, ``state.json`` and any tensor file that is not
  content-addressed as its artifacts;
- the content-addressed tensor files (``t-<digest>.safetensors``) once per run, in the run's
  artifacts under ``ckpt_track/blobs/``: a checkpoint uploads only the ones the run does not
  hold yet, and deleting a checkpoint removes only the ones no other checkpoint names;
- the checkpoint's metrics, logged on the run with ``step`` and ``model_id``;
- tags: ``step``, ``ckpt_track.version``, ``ckpt_track.alias.<alias>``, ``aliases`` (the
  list, readable) and lineage (``ckpt_track.parent``, ``ckpt_track.resumed_from``, git commit,
  config hash);
- the run config as the model's params, and a description (``mlflow.note.content``) with the
  step, the aliases and the exact restore commands, rewritten when an alias moves;
- ``ckpt_track_files.json`` in the model's artifacts: which tensors each file holds (names,
  dtypes, shapes, sizes; no tensor data), so the run's ``ckpt_track/blobs/`` is browsable;
- optionally (``register_as``) a registered model version per checkpoint with the same tags
  and description, and the registry alias ``best`` kept current (MLflow reserves ``latest``:
  its own ``models:/<name>/latest`` already means the newest checkpoint);
- experiments ckpt_track creates are tagged ``mlflow.experimentKind=custom_model_development``
  (machine learning, not GenAI).

On resume from an MLflow checkpoint the source model is logged as an input of the new run.
The SDK is imported on first use only.

The package's modules: :mod:`.backend` maps the Protocol onto MLflow; :mod:`.client` is the
SDK boundary (the client, artifact repositories, the error table); :mod:`.blobs` keeps the
run-level content-addressed files; :mod:`.handles` the typed handles and tags; :mod:`.native`
the description, listing and registry tags the UI shows; :mod:`.runs` finds runs by name and
lists experiments and runs; :mod:`.settings` says which setting wins (ckpt_track's, then the
SDK's environment, then a pasted UI URL, Databricks included); :mod:`.refs` parses UI URLs,
``runs:/`` and ``models:/``; :mod:`._compat` isolates the one SDK name outside MLflow's
documented API.
"""

from __future__ import annotations

from .backend import MlflowBackend, MlflowOptions
from .client import MlflowSdk
from .handles import BLOBS, MlflowModel, MlflowRun

__all__ = ["BLOBS", "MlflowBackend", "MlflowModel", "MlflowOptions", "MlflowRun", "MlflowSdk"]
