"""The ``comet`` backend: checkpoints as models of a Comet experiment.

A run is an experiment; checkpoint version N is the experiment model
``ckpt-v<N>-step<S>``.  One model per checkpoint lets the Models tab,
``get_model_asset_list(name)`` and ``download_model(name)`` address exactly one
checkpoint (one name per run would mix every step's files).  Each file is a
model element carrying the same metadata: version, step, epoch, metrics, the
aliases it got, lineage and every file's size (a half-uploaded model is never
listed).  Content-addressed tensor files (``format.is_blob``) are not model
elements but experiment assets ``ckpt_track/blobs/<file>``, logged once per
experiment and shared by every checkpoint that names them (metadata ``blobs``).
Metrics also go to ``log_metrics(step=)``.  Comet models have no aliases, so
the alias table, the highest version used and deleted versions live in the
experiment "other" ``ckpt_track.state``; resume lineage in ``ckpt_track.resumed_from``.

Online: ``Experiment`` writes, ``API`` reads.  Offline (``online = false``):
``OfflineExperiment`` writes ``<key>.zip`` for ``comet upload``, and every
checkpoint is also kept in ``<offline_directory>/ckpt_track/<key>/v<N>/`` so any
process can restore it at once, also after a crash that never wrote the zip (the
local store of ``backends/_store.py``, one store run per experiment key).
See ``backends/comet.md``.

The package: ``backend`` (the Protocol mapping and the experiments of this process), ``mode``
with ``online`` and ``offline`` (where checkpoints are read back from, chosen once),
``upload`` (logging one checkpoint, the same in both), ``assets`` (models read back from the
server), ``model_registry`` (read-only), ``handles`` (the typed ``native`` handles and the
``ckpt_track.state`` other), ``refs`` (names and references, no SDK needed) and ``sdk`` (the
comet_ml boundary and its error table).
"""

from __future__ import annotations

from .backend import CometBackend, CometOptions
from .handles import (
    BLOB_PREFIX,
    RESUMED_FROM_KEY,
    RUN_ID_KEY,
    STATE_KEY,
    CometCopy,
    CometModel,
    CometRegistryModel,
    CometRun,
)
from .refs import model_name

__all__ = ["BLOB_PREFIX", "RESUMED_FROM_KEY", "RUN_ID_KEY", "STATE_KEY", "CometBackend", "CometCopy", "CometModel",
           "CometOptions", "CometRegistryModel", "CometRun", "model_name"]
