"""then-memory: Live memory that ingests instead of training: a GPU/RAM/disk trace store with per-user state."""

from then_memory.__about__ import __version__

__all__ = ["__version__"]
