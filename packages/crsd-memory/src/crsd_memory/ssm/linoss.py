"""LinOSS: oscillatory state-space models (Rusch and Rus, 2025).

``P`` uncoupled forced harmonic oscillators driven by the layer input::

    y''(t) = -A y(t) + B u(t),    out = C y + D * u        A = relu(A_hat) >= 0 (P,), B (P, H), C (H, P)

written first-order with the velocity ``z = y'`` and stepped by a learned ``dt`` per
oscillator (``dt = sigmoid(.)`` in (0, 1)). Two discretisations, as in the paper:

* IM (implicit): ``z_t = z_{t-1} + dt (-A y_t + B u_t)``, ``y_t = y_{t-1} + dt z_t``. Solved per
  oscillator with ``S = 1 / (1 + dt^2 A)``::

      [z_t]   [ S       -dt A S ] [z_{t-1}]   [dt   S B u_t]
      [y_t] = [ dt S     S      ] [y_{t-1}] + [dt^2 S B u_t]

  its eigenvalues have modulus ``sqrt(S) <= 1``: dissipative, stable for any ``A >= 0``, ``dt``.
* IMEX (implicit-explicit): ``z_t = z_{t-1} + dt (-A y_{t-1} + B u_t)``, ``y_t = y_{t-1} + dt z_t``::

      M = [[1, -dt A], [dt, 1 - dt^2 A]],   F = [dt B u_t, dt^2 B u_t]

  with ``det M = 1``: symplectic (time-reversible, conserves a discrete energy), stable while
  ``dt^2 A <= 4``.

The forward pass runs ``x_t = M x_{t-1} + F_t`` as a parallel associative scan over 2x2 blocks
(:mod:`crsd_memory.ssm.scan`), ``chunk_size`` tokens at a time; ``step`` runs one token. The
official code uses complex ``B`` and ``C`` and takes the real part; here they are real (the
oscillator state is real either way). The block is the S5-style one (:class:`SSMBlock`).

State per layer: ``ssm (B, P, 2)`` float32, ``[..., 0]`` the velocities ``z``, ``[..., 1]`` the
positions ``y``; it is the injectable entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crsd_memory.ssm.common import SSMBlock, StackBackbone
from crsd_memory.ssm.reference import linoss_naive
from crsd_memory.ssm.scan import associative_scan


def _compose(a2: Tensor, a1: Tensor) -> Tensor:
    return a2 @ a1  # (..., 2, 2)


def _apply(a: Tensor, x: Tensor) -> Tensor:
    return (a @ x.unsqueeze(-1)).squeeze(-1)  # (..., 2)


class LinOSSMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, variant: str = "im", dt_min: float = 0.01,
                 dt_max: float = 1.0, chunk_size: int = 64) -> None:
        super().__init__()
        H, P = d_model, d_state
        self.d_model, self.d_state, self.variant = H, P, variant
        self.chunk_size, self.impl = chunk_size, "fast"
        self.A_hat = nn.Parameter(torch.rand(P))
        dt = torch.empty(P).uniform_(dt_min, min(dt_max, 1 - 1e-3))
        self.dt_logit = nn.Parameter(torch.log(dt) - torch.log1p(-dt))
        self.B = nn.Parameter(torch.randn(P, H) / math.sqrt(H))
        self.C = nn.Parameter(torch.randn(H, P) / math.sqrt(P))
        self.D = nn.Parameter(torch.randn(H))

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        return {"ssm": torch.zeros(batch_size, self.d_state, 2, device=device)}

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``A (P,) >= 0`` and ``dt (P,)`` in (0, 1)."""
        return F.relu(self.A_hat.float()), torch.sigmoid(self.dt_logit.float())

    def transition(self) -> tuple[Tensor, Tensor]:
        """``M (P, 2, 2)`` acting on ``[z, y]`` and ``f (P, 2)``, with ``F_t = f * (B u_t)``."""
        A, dt = self.coefficients()
        one = torch.ones_like(A)
        if self.variant == "im":
            S = 1 / (1 + dt**2 * A)
            M = torch.stack([torch.stack([S, -dt * A * S], -1), torch.stack([dt * S, S], -1)], -2)
            f = torch.stack([dt * S, dt**2 * S], -1)
        else:
            M = torch.stack([torch.stack([one, -dt * A], -1), torch.stack([dt, one - dt**2 * A], -1)], -2)
            f = torch.stack([dt, dt**2], -1)
        return M, f

    def forward(self, u: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        Bt, T, _ = u.shape
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            x0 = state["ssm"].float() if state else torch.zeros(Bt, self.d_state, 2, device=u.device)
            if self.impl == "naive":
                A, dt = self.coefficients()
                y, z, yT = linoss_naive(u, A, dt, self.B.float(), self.C.float(), self.D.float(), x0[..., 0],
                                        x0[..., 1], self.variant)
                return y, {"ssm": torch.stack([z, yT], -1)}
            M, f = self.transition()
            Fin = (u @ self.B.float().T).unsqueeze(-1) * f  # (B, T, P, 2)
            xs, x = associative_scan(M.expand(Bt, T, -1, -1, -1), Fin, x0, self.chunk_size, _compose, _apply)
            y = xs[..., 1] @ self.C.float().T + self.D.float() * u  # (B, T, H)
        return y, {"ssm": x}

    def step(self, u_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(u_t.device.type, enabled=False):
            u_t = u_t.float()
            M, f = self.transition()
            x = _apply(M, state["ssm"].float()) + (u_t @ self.B.float().T).unsqueeze(-1) * f  # (B, P, 2)
            y = x[..., 1] @ self.C.float().T + self.D.float() * u_t
        return y, {"ssm": x}


def build(params, ctx) -> StackBackbone:
    """Factory of backbone ``linoss``: ``n_layers`` :class:`SSMBlock` of :class:`LinOSSMixer`."""
    D = ctx.d_model
    layers = [SSMBlock(D, LinOSSMixer(D, params.d_state, params.variant, params.dt_min, params.dt_max,
                                      params.chunk_size), params.dropout)
              for _ in range(params.n_layers)]
    return StackBackbone(D, layers, "ssm")
