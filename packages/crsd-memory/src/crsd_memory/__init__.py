"""crsd-memory: Hebbian associative memory, a priority episodic buffer and the CRSD cell."""

from crsd_memory.__about__ import __version__

__all__ = ["__version__"]
