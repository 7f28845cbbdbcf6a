"""Slow, obviously-correct sequential references for the SSM backbones' fast paths.

Each runs its recurrence one token at a time, exactly as the papers write it; the fast
paths (FFT convolution, associative scans, parallel/chunkwise retention, windowed attention)
are tested against these on random inputs, values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_recurrence(a: Tensor, b: Tensor, h0: Tensor, apply=lambda a, x: a * x) -> tuple[Tensor, Tensor]:
    """``h_t = apply(a_t, h_{t-1}) + b_t``; ``a, b (B, T, ...)``, ``h0 (B, ...)``."""
    h, hs = h0, []
    for t in range(b.shape[1]):
        h = apply(a[:, t], h) + b[:, t]
        hs.append(h)
    return torch.stack(hs, 1), h


def s4d_naive(u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """S4D per channel ``d`` and complex mode ``n`` (conjugate pairs folded into ``2 Re``)::

        x_t[d, n] = dA[d, n] x_{t-1}[d, n] + dB[d, n] u_t[d]
        y_t[d]    = 2 Re(sum_n C[d, n] x_t[d, n]) + D[d] u_t[d]

    ``u (B, T, D)`` real, ``dA, dB, C (D, N)`` complex, ``x0 (B, D, N)`` complex.
    """
    x, ys = x0, []
    for t in range(u.shape[1]):
        x = dA * x + dB * u[:, t, :, None]  # (B, D, N)
        ys.append(2 * (x * C).sum(-1).real + D * u[:, t])
    return torch.stack(ys, 1), x


def s5_naive(u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """S5 (MIMO, diagonal state matrix), state ``x (B, P)`` complex::

        x_t = dA * x_{t-1} + dB u_t          dA (P,), dB (P, H) complex
        y_t = 2 Re(C x_t) + D * u_t          C (H, P) complex, D (H,)
    """
    x, ys = x0, []
    for t in range(u.shape[1]):
        x = dA * x + u[:, t].to(dB.dtype) @ dB.T  # (B, P)
        ys.append(2 * (x @ C.T).real + D * u[:, t])
    return torch.stack(ys, 1), x


def linoss_naive(u: Tensor, A: Tensor, dt: Tensor, B: Tensor, C: Tensor, D: Tensor, z0: Tensor, y0: Tensor,
                 variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """LinOSS, the oscillator ``y'' = -A y + B u`` with ``z = y'`` stepped by ``dt``::

        IM:   z_t = z_{t-1} + dt (-A y_t     + B u_t),  y_t = y_{t-1} + dt z_t   (implicit in y_t)
        IMEX: z_t = z_{t-1} + dt (-A y_{t-1} + B u_t),  y_t = y_{t-1} + dt z_t
        out_t = C y_t + D * u_t

    ``A, dt (P,)`` with ``A >= 0``; ``B (P, H)``, ``C (H, P)``, ``D (H,)``; ``z0, y0 (B, P)``.
    The implicit step is solved per oscillator: ``(1 + dt^2 A) y_t = y_{t-1} + dt z_{t-1} + dt^2 B u_t``.
    """
    z, y, outs = z0, y0, []
    for t in range(u.shape[1]):
        bu = u[:, t] @ B.T  # (B, P)
        if variant == "im":
            y_new = (y + dt * z + dt**2 * bu) / (1 + dt**2 * A)
            z = z + dt * (-A * y_new + bu)
            y = y_new
        else:
            z = z + dt * (-A * y + bu)
            y = y + dt * z
        outs.append(y @ C.T + D * u[:, t])
    return torch.stack(outs, 1), z, y


def retention_naive(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, theta: Tensor, S0: Tensor) -> tuple[Tensor, Tensor]:
    """Retention, recurrent form, with the rotation folded into the state::

        S_t = gamma * rot(S_{t-1}, -theta) + k_t^T v_t       S (B, H, dk, dv)
        o_t = q_t S_t

    ``q, k (B, T, H, dk)``, ``v (B, T, H, dv)``, ``gamma (H,)``, ``theta (dk/2,)`` the
    per-pair angles; ``rot(., -theta)`` turns each (even, odd) pair of key rows by one step
    back, so ``q_t . k_s`` meets the relative rotation ``(t - s) theta`` (xPos/RoPE).
    """
    from crsd_memory.ssm.retnet import rotate

    S, outs = S0, []
    for t in range(q.shape[1]):
        S = gamma[:, None, None] * rotate(S, -theta, dim=-2) + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


def window_attention_naive(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, window: int) -> Tensor:
    """Causal attention of each query over the last ``window`` positions (itself included),
    one query at a time. ``k, v (B, S, H, dh)`` hold ``S - T`` cached positions then the ``T``
    new ones, ``q (B, T, H, dh)`` the new ones; ``valid (B, S)`` marks cache slots holding a
    token. Queries and keys already rotated."""
    T, S = q.shape[1], k.shape[1]
    outs = []
    for t in range(T):
        p = S - T + t  # the query's position among the keys
        lo = max(0, p - window + 1)
        s = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, lo : p + 1]) / q.shape[-1] ** 0.5
        s = s.masked_fill(~valid[:, None, lo : p + 1].bool(), float("-inf"))
        outs.append(torch.einsum("bhs,bshd->bhd", s.softmax(-1), v[:, lo : p + 1]))
    return torch.stack(outs, 1)
