"""Working tools on stored checkpoints, one module per operation; each works on any backend
through the Protocol only, and resolves references through :mod:`ckpt_track.resolve`.

- :mod:`.lineage`: the chain from a checkpoint back to its root, across runs and backends
- :mod:`.diff`: metric deltas and per-tensor differences of two checkpoints
- :mod:`.gc`: retention applied to a run
- :mod:`.copy`: checkpoints copied between runs and trackers; the copy-target grammar
- :mod:`.average`: the mean of several checkpoints' model weights

The flat public API is :mod:`ckpt_track.tools`.  This package does not re-export the
functions: each one shares its module's name, and a re-export would hide the module.
"""
