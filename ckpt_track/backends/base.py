"""Names a backend plugin imports: the Protocol and the records it exchanges.

They live in the core (``ckpt_track.protocol``, ``ckpt_track.records``,
``ckpt_track.boundary``); this module re-exports them for plugins written against it.
"""

from __future__ import annotations

from ..boundary import sdk_errors
from ..protocol import Backend
from ..records import Capability, ResumeMode, RunInfo, RunSpec, Stored

__all__ = ["Backend", "Capability", "ResumeMode", "RunInfo", "RunSpec", "Stored", "sdk_errors"]
