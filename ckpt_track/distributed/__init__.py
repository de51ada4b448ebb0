"""Multi-rank checkpoints on torch.distributed.checkpoint (DCP): DDP, FSDP2, tensor parallel.

Under an initialized process group of more than one rank, ``ct.init``, ``log_checkpoint``
and ``resume`` are collective (every rank calls them): rank 0 opens the tracker run, every
rank writes its own shards into one version, rank 0 commits it once and uploads it; a resume
reshards to the current world size.  See the README's "Multi-GPU and multi-node" section.

- :mod:`.comm`: the handshake through the process group's store, the dedicated gloo groups,
  JSON collectives (no pickle);
- :mod:`.capture`: a rank's state through ``get_state_dict``, split and staged;
- :mod:`.storage`: ckpt_track's DCP ``StorageWriter`` / ``StorageReader``;
- :mod:`.layout`: ``layout.json``, the JSON stand-in for DCP's pickled metadata;
- :mod:`.restore`: loading at any world size, all or nothing;
- :mod:`.run`: :class:`DistributedRun`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..run import Run
    from .run import DistributedRun

__all__ = ["init_collective"]


def init_collective(settings: Any, make_run: Any) -> Run | DistributedRun:
    """``ct.init`` under a process group: rank 0 makes the run (``make_run()``) and tells the
    other ranks; each rank gets a :class:`DistributedRun` (rank 0 alone in "auto" mode, when
    no other rank calls ``ct.init``, gets the plain run)."""
    from .comm import handshake
    from .run import DistributedRun, identity_of

    made: list[Run] = []

    def publish() -> dict[str, Any]:
        made.append(make_run())
        return identity_of(made[0])

    comm, identity = handshake(settings.distributed, settings.collective_timeout, publish)
    if comm is None:
        return made[0]
    return DistributedRun(comm, made[0] if made else None, identity or {}, settings)
