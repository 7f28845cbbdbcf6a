"""A chunked parallel (associative) scan for linear recurrences ``h_t = a_t o h_{t-1} + b_t``.

The elements are pairs ``(a_t, b_t)``; combining an earlier pair with a later one,
``(a1, b1) . (a2, b2) = (a2 o a1, a2 o b1 + b2)``, is associative, so all prefixes come out of
``log2(L)`` rounds of elementwise work (Hillis-Steele). ``o`` is supplied by the caller:
elementwise products for diagonal (complex) SSMs like S5, 2x2 matrix products for LinOSS.
The sequence is scanned ``chunk_size`` tokens at a time, each chunk from the previous
chunk's last state, so the work is ``O(T log2 chunk_size)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Apply = Callable[[Tensor, Tensor], Tensor]  # (a, x) -> a o x, for x a state or another a


def _scan_chunk(a: Tensor, b: Tensor, h0: Tensor, compose: Apply, apply: Apply) -> Tensor:
    """All prefixes of one chunk: ``a, b (B, L, ...)``, ``h0 (B, ...)`` -> ``h (B, L, ...)``."""
    b = torch.cat([apply(a[:, :1], h0.unsqueeze(1)) + b[:, :1], b[:, 1:]], dim=1)  # fold h0 into step 0
    L, k = b.shape[1], 1
    while k < L:
        # combine every element with the prefix k steps earlier
        b = torch.cat([b[:, :k], apply(a[:, k:], b[:, :-k]) + b[:, k:]], dim=1)
        a = torch.cat([a[:, :k], compose(a[:, k:], a[:, :-k])], dim=1)
        k *= 2
    return b


def associative_scan(a: Tensor, b: Tensor, h0: Tensor, chunk_size: int, compose: Apply, apply: Apply) -> tuple[Tensor, Tensor]:
    """``h_t = apply(a_t, h_{t-1}) + b_t`` for ``t < T``, from ``h0``.

    ``a (B, T, ...)`` (already expanded over the batch), ``b (B, T, ...)``, ``h0 (B, ...)``;
    ``compose(a2, a1)`` is the operator of "``a1`` then ``a2``". Returns ``(h (B, T, ...), h_T)``.
    Reference: :func:`crsd_memory.ssm.reference.linear_recurrence`.
    """
    hs = []
    for c0 in range(0, b.shape[1], chunk_size):
        h = _scan_chunk(a[:, c0 : c0 + chunk_size], b[:, c0 : c0 + chunk_size], h0, compose, apply)
        hs.append(h)
        h0 = h[:, -1]
    return torch.cat(hs, dim=1), h0


def diagonal(a: Tensor, x: Tensor) -> Tensor:
    """``o`` for diagonal operators: the elementwise product."""
    return a * x
