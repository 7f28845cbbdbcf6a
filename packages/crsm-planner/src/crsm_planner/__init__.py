"""crsm-planner: A steerable Mamba backbone and an asynchronous MCTS planner with gated state injection."""

from crsm_planner.__about__ import __version__

__all__ = ["__version__"]
