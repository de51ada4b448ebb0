"""Tracker backends behind one small Protocol (see :mod:`.base`) and the registry."""

from ..protocol import Backend
from ..records import RunInfo, RunSpec, Stored

__all__ = ["Backend", "RunInfo", "RunSpec", "Stored"]
