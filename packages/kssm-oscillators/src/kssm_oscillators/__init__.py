"""kssm-oscillators: The Kuramoto state-space model, bistability constraints and causality probes."""

from kssm_oscillators.__about__ import __version__

__all__ = ["__version__"]
