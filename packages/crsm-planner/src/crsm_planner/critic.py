"""What the planner knows about its own injections: a critic that ranks them and a novelty test.

* :class:`InjectionCritic` -- ``Q(z, dz)``: the realised change of the backbone's mean loss
  over the next ``value_horizon`` tokens when the state with latent ``z (..., L)`` is moved
  by the decoded latent change ``dz (..., L)`` at the reference alpha ``alpha_max``. An
  ensemble of ``members`` small MLPs, each fitted on its own bootstrap resample of the
  realised deltas that :meth:`MCTSPlanner._fit_gate` measures for every root child of the
  search (so the search's own proposals are its training data). Their mean ranks the
  candidate injections; their spread is the per-state uncertainty that drives alpha.
* :class:`Novelty` -- how far a state lies from those the planner was fitted on: the larger
  of (a) its codec residual (the part of the normalised state the latent cannot represent)
  and (b) its latent's mean squared z-score, each divided by its 99th percentile on the
  fitting states. 1 is the edge of the fitting distribution; :meth:`Novelty.trust` is 1
  up to there and falls linearly to 0 at twice that, so an off-distribution state gets
  ``alpha = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InjectionCritic(nn.Module):
    """``(z (..., L), dz (..., L))`` -> per-member predicted loss change ``(M, ...)`` (negative: the move helps)."""

    def __init__(self, d_latent: int, d_hidden: int, members: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d_latent, d_hidden), nn.GELU(), nn.Linear(d_hidden, 1)) for _ in range(members)
        )
        self.register_buffer("scale", torch.ones(()))  # the typical |delta| of the fit: targets are divided by it
        self.register_buffer("fitted", torch.zeros(()))

    def forward(self, z: Tensor, dz: Tensor) -> Tensor:
        x = torch.cat([z, dz], dim=-1)  # (..., 2L)
        return torch.stack([net(x).squeeze(-1) for net in self.nets]) * self.scale  # (M, ...)

    def gain(self, z: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted loss *decrease* ``(...)`` (ensemble mean) and its spread (ensemble sd)."""
        d = self(z, dz)
        return -d.mean(0), d.std(0, unbiased=False)

    def fit(self, z: Tensor, dz: Tensor, delta: Tensor, *, steps: int, lr: float, generator: torch.Generator) -> float:
        """Regress ``delta (N,)`` on ``(z (N, L), dz (N, L))``, each member on its own bootstrap
        resample; returns the ensemble's mean squared error on the data (in delta units)."""
        n = delta.shape[0]
        self.scale.fill_(float(delta.abs().mean().clamp_min(1e-6)))
        target = delta / self.scale
        for net in self.nets:
            idx = torch.randint(0, n, (n,), generator=generator).to(z.device)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            x = torch.cat([z[idx], dz[idx]], dim=-1)
            for _ in range(steps):
                loss = (net(x).squeeze(-1) - target[idx]).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.fitted.fill_(1.0)
        with torch.no_grad():
            return float((self(z, dz).mean(0) - delta).pow(2).mean())


class Novelty(nn.Module):
    """Distance of a state from the planner's fitting states, in units of their 99th percentile."""

    def __init__(self, d_latent: int) -> None:
        super().__init__()
        self.register_buffer("z_mean", torch.zeros(d_latent))
        self.register_buffer("z_var", torch.ones(d_latent))
        self.register_buffer("resid_q", torch.full((), float("inf")))  # inf: uncalibrated, every state is familiar
        self.register_buffer("zscore_q", torch.full((), float("inf")))

    @staticmethod
    def residual(sn: Tensor, recon: Tensor) -> Tensor:
        """Mean squared codec residual per state ``(...)`` of normalised states and their reconstructions."""
        return (sn - recon).pow(2).mean(-1)

    def zscore(self, z: Tensor) -> Tensor:
        return ((z - self.z_mean).pow(2) / self.z_var.clamp_min(1e-12)).mean(-1)

    @torch.no_grad()
    def calibrate(self, z: Tensor, resid: Tensor) -> None:
        """From the fitting states' latents ``z (N, L)`` and residuals ``resid (N,)``."""
        self.z_mean.copy_(z.mean(0))
        self.z_var.copy_(z.var(0, unbiased=False))
        self.resid_q.fill_(float(torch.quantile(resid.float(), 0.99).clamp_min(1e-12)))
        self.zscore_q.fill_(float(torch.quantile(self.zscore(z).float(), 0.99).clamp_min(1e-12)))

    def score(self, z: Tensor, resid: Tensor) -> Tensor:
        """``(...)``: 1 at the 99th percentile of the fitting states, larger further out."""
        return torch.maximum(resid / self.resid_q, self.zscore(z) / self.zscore_q)

    def trust(self, z: Tensor, resid: Tensor) -> Tensor:
        """1 within the fitting distribution, falling linearly to 0 at twice its edge."""
        return (2.0 - self.score(z, resid)).clamp(0.0, 1.0)
