"""The chunked form of the Hebbian memory's general write: delta rule and per-token decay.

Reference: :func:`crsd_memory.reference.memory_sequence`. Per head, token ``t`` with decay
``a_t = exp(log_a_t)`` and write strength ``beta_t``::

    H_t = a_t H_{t-1} + k_t delta_t^T
    delta_t = beta_t v_t                                   (Hebbian)
    delta_t = beta_t (v_t - (a_t H_{t-1})^T k_t)            (delta rule, DeltaNet / Gated DeltaNet)

Inside a chunk of C tokens starting from ``H0``, with ``b_i = sum_{j<=i} log a_j`` (cumulative
log decay) and ``L_ij = exp(b_i - b_j)`` for ``j <= i`` (0 above the diagonal)::

    H_i     = e^(b_i) H0 + sum_{j<=i} L_ij k_j delta_j^T
    r_i     = [ e^(b_i) q_i^T H0 + sum_{j<=i} L_ij (q_i . k_j) delta_j ] / temperature
    H_C     = e^(b_C) H0 + sum_j L_Cj k_j delta_j^T

For the delta rule the chunk's deltas depend on each other: substituting ``a_i H_{i-1}``
gives one unit lower-triangular system (the "WY"/UT form of the chunked delta rule)::

    (I + A) Delta = beta * (V - e^(b) * (K H0)),    A_ij = beta_i L_ij (k_i . k_j)  for j < i

solved with one triangular solve per chunk (autograd differentiates through it). All
intermediates are (B, heads, C, C) or (B, heads, C, d); the decay ratios are formed with
the upper triangle masked to -inf before the exp, so nothing overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crsd_memory.reference import topk_magnitude


def memory_chunked(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, log_a: Tensor, beta: Tensor, delta: bool, temperature: float,
    topk: int | None, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Same arguments and results as :func:`crsd_memory.reference.memory_sequence`: ``q, k``
    unit vectors and ``v`` (B, heads, T, d); ``H`` (B, heads, d, d); ``log_a, beta``
    broadcastable to (B, heads, T). Returns ``(r (B, heads, T, d), H_T)``."""
    B, h, T, d = q.shape
    log_a, beta = log_a.expand(B, h, T), beta.expand(B, h, T)
    out = []
    for c0 in range(0, T, chunk_size):
        qc, kc, vc = (z[:, :, c0 : c0 + chunk_size] for z in (q, k, v))  # (B, h, C, d)
        bc = beta[:, :, c0 : c0 + chunk_size].unsqueeze(-1)  # (B, h, C, 1)
        cum = log_a[:, :, c0 : c0 + chunk_size].cumsum(-1)  # (B, h, C) b_i
        C = qc.shape[2]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # (C, C) j <= i
        diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # (B, h, C, C) b_i - b_j
        L = torch.exp(diff.masked_fill(~causal, float("-inf")))  # (B, h, C, C)
        g_in = torch.exp(cum).unsqueeze(-1)  # (B, h, C, 1) e^(b_i)
        if delta:
            A = (bc * L * (kc @ kc.transpose(-1, -2))).tril(-1)  # (B, h, C, C) strictly lower
            eye = torch.eye(C, dtype=q.dtype, device=q.device)
            rhs = bc * (vc - g_in * (kc @ H))  # (B, h, C, d)
            D = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)  # (B, h, C, d)
        else:
            D = bc * vc  # (B, h, C, d)
        out.append(((qc @ kc.transpose(-1, -2)) * L) @ D + g_in * (qc @ H))  # (B, h, C, d)
        to_end = torch.exp(cum[:, :, -1:] - cum).unsqueeze(-1)  # (B, h, C, 1) L_Cj
        H = torch.exp(cum[:, :, -1])[..., None, None] * H + (kc * to_end).transpose(-1, -2) @ D  # (B, h, d, d)
    return topk_magnitude(torch.cat(out, dim=2) / temperature, topk), H
