"""Tracker backends behind one small Protocol (see :mod:`.base`) and the registry."""

from .base import Backend, RunInfo, RunSpec, Stored

__all__ = ["Backend", "RunInfo", "RunSpec", "Stored"]
