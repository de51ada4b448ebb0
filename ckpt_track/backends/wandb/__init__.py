"""The ``wandb`` backend: each checkpoint is a version of the run's model artifact ``ckpt-<run id>``.

What W&B shows for a checkpoint logged here:

- an artifact version of type ``model`` holding every checkpoint file, added one by one:
  each version is self-contained, and a content-addressed tensor file
  (``t-<hash>.safetensors``) that did not change keeps its name and MD5, so W&B's
  digest dedup does not upload it again (``Stored.uploaded`` counts what is sent);
- its metadata: ``step``, ``epoch``, ``metrics``, ``created``, ``size``, ``lineage`` and
  ``manifest_xxh3`` (the hash of the ckpt_track manifest);
- the aliases the core decides (``latest``, ``best``, ``step-N``, your own); W&B keeps
  each alias on one version of the collection, so setting one moves it;
- the metrics in run history as ``checkpoint/<name>`` against the custom x-axis
  ``checkpoint/step`` (``define_metric``), never with ``log(step=)``: W&B drops rows whose
  step goes backwards, which a resume from an earlier checkpoint would cause;
- on resume the source artifact as an input of the new run (``use_artifact``), and in
  the run config as ``ckpt_track.resumed_from``;
- optionally (``registry``) each checkpoint that becomes ``best`` linked into a
  registry collection.

Versions: ckpt_track numbers versions from 1, W&B from 0, so ``wandb://e/p/<run>:vN``
is the W&B artifact ``e/p/ckpt-<run>:v<N-1>``.

Offline (``mode = "offline"``) the real SDK writes the run and its artifacts to the
``.wandb`` record log for a later ``wandb sync``, but nothing can be read back from W&B
offline.  So checkpoints also live in a small store next to the offline runs,
``<dir>/wandb/ckpt_track/<project>/<run id>/`` (``run.json`` plus ``v000001/`` ...),
and the record log points at those files in place; ``list``/``get`` read that store.
``mode = "disabled"`` keeps only that store and never calls W&B.  The SDK is imported
on first use only.

The package: :mod:`.backend` (the Protocol mapping, the mode chosen once), :mod:`.online` and
:mod:`.offline` (the two ways of keeping checkpoints: the W&B server, or the local store
:class:`ckpt_track.backends._store.DirStore`), :mod:`.sdk` (the SDK boundary and its error
table), :mod:`.live` (runs open in this process), :mod:`.refs` (W&B reference forms),
:mod:`.common` (typed handles, metadata), :mod:`._compat` (SDK internals without a public API).
"""

from __future__ import annotations

from .backend import WandbBackend, WandbOptions
from .common import WandbRun, WandbVersion
from .refs import ARTIFACT_PREFIX

__all__ = ["ARTIFACT_PREFIX", "WandbBackend", "WandbOptions", "WandbRun", "WandbVersion"]
