"""The ``clearml`` backend: checkpoints as ClearML models (online) or task artifacts (offline).

Online, each checkpoint is an ``OutputModel`` of the run's task: the checkpoint
directory packed as one uncompressed zip (ClearML's "package" model, so
``Model(id).get_local_copy()`` gives the directory back), aliases as model tags,
and step, epoch, metrics and lineage as model metadata; metrics also go to the
task's scalars with ``iteration=step``.  A run resumed from a checkpoint gets it
connected as an ``InputModel``.

Offline (``offline = true`` or ``CLEARML_OFFLINE_MODE=1``) ``OutputModel`` cannot
upload (clearml 2.x: ``'DummyModel' object has no attribute 'locked'``), so each
checkpoint is a task artifact (``upload_artifact`` of the directory) with the same
metadata, and the alias table lives in the task's user properties.  Those
survive ``clearml-task --import-offline-session``, so an imported run stays
restorable online; before that, ``list``/``get`` read the session folder (or its
zip) the SDK wrote.  Versions are counted per task in the user property
``ckpt_track_last_version``, so a deleted version number is never reused.

Incremental: a content-addressed tensor file (``format.is_blob``) is stored once per
task, as its own artifact ``ckpt_track-blob-t-<hex>.safetensors``; the checkpoint's
model or artifact holds the rest (manifest, state, any other file) and lists the
blobs it takes in its metadata (``blobs``), so ``get`` reassembles the directory and
``delete`` removes a blob only when no other checkpoint of the task lists it.

``ct.init`` uses the ``Task.init`` you already made, or makes one (a second run in
the same process gets ``Task.create``), stopping ClearML from reseeding the
training's random generators on the way.  See ``backends/clearml.md``.

The package, by concern:

- :mod:`.backend`: the Protocol mapped onto ClearML (``ClearmlBackend``);
- :mod:`.online` / :mod:`.offline`: where a run's checkpoints live, on the server or in an
  offline session (one strategy per run); :mod:`.offline` also reads the sessions on disk;
- :mod:`.continuation`: an offline run restarted with the same name continues in a new session;
- :mod:`.listing`: ``list_projects`` / ``list_runs``;
- :mod:`.tasks`: the tasks this process writes to (``Task.init``, ``Task.create``, closing);
- :mod:`.client`: the REST client over the SDK's session; :mod:`.sdk`: the SDK boundary
  (import, error table, ``Task.init`` without reseeding);
- :mod:`.metadata`: the checkpoint record, user properties and typed handles;
- :mod:`.package`: the package zip; :mod:`.refs`: reference forms and UI links;
- :mod:`._compat`: the SDK internals used where the SDK has no public API.
"""

from __future__ import annotations

from .backend import ClearmlBackend, ClearmlOptions
from .metadata import ClearmlCheckpoint, ClearmlRun

__all__ = ["ClearmlBackend", "ClearmlCheckpoint", "ClearmlOptions", "ClearmlRun"]
