"""traces-crystallize: A transformer with persistent attention traces, routing-path logging and motif crystallization."""

from traces_crystallize.__about__ import __version__

__all__ = ["__version__"]
