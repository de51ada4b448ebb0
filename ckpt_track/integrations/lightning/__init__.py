"""PyTorch Lightning integration: log checkpoints from a callback, resume from any reference.

>>> from ckpt_track.integrations.lightning import CkptTrackCallback, resume_ref
>>> cb = CkptTrackCallback(project="mnist", name="run-1", every_n_train_steps=100)  # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[cb], enable_checkpointing=False)                 # doctest: +SKIP
>>> trainer.fit(model, ckpt_path=resume_ref("local://mnist/run-1"))                 # doctest: +SKIP

``enable_checkpointing=False`` turns off Lightning's own ``ModelCheckpoint``, which would
also write pickled ``.ckpt`` files (the callback warns when it is on).  ``resume_ref``
gives the run's latest checkpoint, or None on the first start (a fresh fit); any
reference works as ``ckpt_path``: ``"local://mnist/run-1@best"``,
``"mlflow://<run_id>@step=300"``, a tracker UI URL.

Logging
-------
:class:`CkptTrackCallback` logs a checkpoint every ``every_n_train_steps`` optimizer
steps and/or every ``every_n_epochs`` epochs (default: every epoch), at
``trainer.global_step``, with the scalar ``trainer.callback_metrics`` of that moment
(``latest``; ``best`` follows ``monitor``/``mode``).  It asks Lightning for the very
checkpoint dict Lightning would write itself (model, optimizers, LR schedulers, fit-loop
progress, callback states, precision state, hyper-parameters) and records it through the
run's backend: the module, the first optimizer and scheduler as ckpt_track's standard
entries (so ``ct.restore(ref, model=module)`` works without Lightning), the whole
Lightning dict under ``extra["lightning"]`` (tensors shared with the standard entries
are stored once), and the RNG states.  The run is made by ``ct.init`` from the
callback's arguments on the first ``fit``, or passed in as ``run=``.

Resuming
--------
Lightning reads ``ckpt_path`` through the strategy's ``CheckpointIO``.  At ``setup`` the
callback wraps that IO in a :class:`CkptTrackCheckpointIO` that loads ckpt_track
references (verified, safetensors + JSON, never unpickled) and hands every other path
to the IO it wraps, so ``Trainer(callbacks=[cb]).fit(model, ckpt_path=ref)`` is all it
takes.  ``Trainer(plugins=[CkptTrackCheckpointIO()])`` also works without the callback,
and then also saves ``ModelCheckpoint`` / ``trainer.save_checkpoint`` files in the
ckpt_track format (a directory) instead of pickles.

Lightning resumes mid-epoch exactly only from dataloaders that have ``state_dict``;
a plain ``DataLoader(shuffle=True, generator=g)`` would replay a different order.  The
callback therefore also stores, in its own callback state, the train dataloaders'
``torch.Generator`` states and the global RNG at the start of the current epoch, plus
how many batches were drawn; on resume it replays the epoch's shuffle and skips the
batches already seen, so training continues bit-identically mid-epoch too (tested).
Keep the callback in the resumed Trainer: the plugin alone restores what Lightning
itself stores, but not the data order.

Values the JSON codec cannot store (a module or a path among the hyper-parameters,
anything odd a ``on_save_checkpoint`` hook adds) never stop training: hyper-parameters
are kept as their ``repr``, any other such value is left out, each with a warning, and
the checkpoint lists them under ``extra["lightning_unstored"]``.

Limits: one process (or DDP, where rank zero logs); sharded strategies (FSDP,
DeepSpeed) are not supported.  The exact data-order replay needs sized, map-style train
dataloaders with ``num_workers=0`` or random augmentations that do not depend on worker
seeds, and no ``reload_dataloaders_every_n_epochs``; otherwise a warning says the order
may differ.

The package: :mod:`.callback` (:class:`CkptTrackCallback`), :mod:`.io`
(:class:`CkptTrackCheckpointIO`), :mod:`.checkpoint` (Lightning's dict to and from the
ckpt_track format: :func:`lightning_checkpoint`, :func:`resume_ref`), :mod:`.data_order`
(the mid-epoch replay) and :mod:`._compat`, the one module that touches a private Lightning
internal (the fit loop's data fetcher, which has no public API); a test fails when the
installed Lightning changes what it relies on.  Everything else uses Lightning's public API
and ckpt_track's public names only.
"""

from __future__ import annotations

from ckpt_track.integrations.lightning.callback import CkptTrackCallback
from ckpt_track.integrations.lightning.checkpoint import (
    EXTRA_KEY,
    SOURCE_KEY,
    UNSTORED_KEY,
    lightning_checkpoint,
    resume_ref,
)
from ckpt_track.integrations.lightning.io import CkptTrackCheckpointIO

__all__ = ["EXTRA_KEY", "SOURCE_KEY", "UNSTORED_KEY", "CkptTrackCallback", "CkptTrackCheckpointIO",
           "lightning_checkpoint", "resume_ref"]
