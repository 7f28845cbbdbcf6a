"""Slow, obviously-correct sequential references for the two SSM scans.

Both run the recurrence one time step at a time in fp32, exactly as the papers write it.
The fast paths (:mod:`crsm_planner.mamba1`, :mod:`crsm_planner.mamba2`,
:mod:`crsm_planner.kernels`) are tested against these on random inputs.

Mamba-1 (selective scan), per channel ``d`` and state index ``n``::

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]

Mamba-2 (SSD), per head ``h`` (scalar decay), channel ``p`` of the head and state ``n``;
head ``h`` reads B and C of group ``h // (H / G)``::

    s_t[h, p, n] = exp(dt_t[h] A[h]) s_{t-1}[h, p, n] + dt_t[h] x_t[h, p] B_t[g, n]
    y_t[h, p]    = sum_n C_t[g, n] s_t[h, p, n] + D[h] x_t[h, p]

``dt`` is the time step after softplus (and bias). Gating and norms are outside the scan.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selective_scan_naive(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``u, dt (Bt, T, Di)``, ``A (Di, N)``, ``B, C (Bt, T, N)``, ``D (Di,)``, ``h0 (Bt, Di, N)``
    -> ``y (Bt, T, Di)`` (fp32), ``h_T (Bt, Di, N)``."""
    Bt, T, Di = u.shape
    N = A.shape[1]
    u, dt, A, B, C = u.float(), dt.float(), A.float(), B.float(), C.float()
    h = torch.zeros(Bt, Di, N, device=u.device) if h0 is None else h0.float()
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t, :, None] * A)  # (Bt, Di, N)
        dBu = dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]  # (Bt, Di, N)
        h = dA * h + dBu
        y = (h * C[:, t, None, :]).sum(-1)  # (Bt, Di)
        if D is not None:
            y = y + D.float() * u[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), h  # (Bt, T, Di)


def ssd_naive(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``x (Bt, T, H, P)``, ``dt (Bt, T, H)``, ``A (H,)``, ``B, C (Bt, T, G, N)``, ``D (H,)``,
    ``h0 (Bt, H, P, N)`` -> ``y (Bt, T, H, P)`` (fp32), ``h_T (Bt, H, P, N)``."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    B = B.repeat_interleave(H // G, dim=2)  # (Bt, T, H, N): head h uses group h // (H/G)
    C = C.repeat_interleave(H // G, dim=2)  # (Bt, T, H, N)
    h = torch.zeros(Bt, H, P, N, device=x.device) if h0 is None else h0.float()
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t] * A)  # (Bt, H)
        h = dA[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = (h * C[:, t, :, None, :]).sum(-1)  # (Bt, H, P)
        if D is not None:
            y = y + D.float()[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), h  # (Bt, T, H, P)
