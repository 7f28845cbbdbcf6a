"""Heads on the planner's latent: the value (future loss) and the next-token prior.

* :class:`ValueHead` predicts the backbone's realised mean loss over the next ``k`` tokens
  from a latent, as a Gaussian (mean and log-variance), trained by regression on the
  backbone's own rollouts over training text. It never needs planner data, which breaks
  the prototype's bootstrapping circle. The search uses ``value = -loss`` (higher is
  better) and the predicted variance as the head's own uncertainty.
* :class:`PriorHead` maps a latent to a hidden vector that the LM's own head turns into
  next-token logits; distilled from the LM (KL) so that nodes below the root get priors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """``z (..., L)`` -> ``(loss_mean (...), loss_logvar (...))``."""

    def __init__(self, d_latent: int, d_hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_latent, d_hidden), nn.GELU(), nn.Linear(d_hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(z)  # (..., 2)
        return out[..., 0], out[..., 1].clamp(-20.0, 20.0)

    @staticmethod
    def loss(mean: Tensor, logvar: Tensor, target: Tensor) -> Tensor:
        """Squared error for the mean plus the Gaussian NLL for the variance (with the mean
        detached there, so a large predicted variance cannot stall the mean's training)."""
        nll = 0.5 * (logvar + (target - mean.detach()).pow(2) * torch.exp(-logvar))
        return ((target - mean).pow(2) + nll).mean()


class PriorHead(nn.Module):
    """``z (..., L)`` -> a hidden vector ``(..., D)`` for the LM head (``model.head``)."""

    def __init__(self, d_latent: int, d_hidden: int, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_latent, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))

    def forward(self, z: Tensor, lm_head: nn.Module) -> Tensor:
        """Next-token logits ``(..., V)`` predicted from a latent."""
        return lm_head(self.net(z))
