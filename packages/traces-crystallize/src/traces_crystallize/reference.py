"""Slow, obviously-correct references for the fast code paths (used by the tests).

* :func:`attention` - explicit softmax attention with a dense trace bias and a KV offset.
* :func:`update_traces` - the trace update rule and quota on Python dicts.
* :func:`exact_salience` - salience with the true gradient ``|dL/dA|`` (autograd).
* :func:`moe` - every expert on every token, combined with the sparse gates.
* :func:`path_counts` - counts of every path segment by brute force.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor


def offsets_matrix(T: int, Tk: int, past: int, device=None) -> Tensor:
    """``off[i, j] = (past + i) - j`` for queries at ``past + i`` and keys at ``j``; -1 where j > past + i."""
    qpos = torch.arange(past, past + T, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    off = qpos - kpos  # (T, Tk)
    return torch.where(off >= 0, off, torch.full_like(off, -1))


def attention(q: Tensor, k: Tensor, v: Tensor, past: int = 0, bias_by_offset: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + b[h, i - j])`` with causal masking; ``q (B, H, T, hd)``,
    ``k, v (B, H, Tk, hd)``, ``bias_by_offset (H, >= Tk)``."""
    B, H, T, hd = q.shape
    Tk = k.shape[2]
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(T):
            scores = []
            for j in range(past + i + 1):
                s = (q[:, h, i] * k[:, h, j]).sum(-1) / math.sqrt(hd)  # (B,)
                if bias_by_offset is not None:
                    s = s + bias_by_offset[h, past + i - j]
                scores.append(s)
            w = torch.stack(scores, -1).softmax(-1)  # (B, j)
            out[:, h, i] = (w[:, :, None] * v[:, h, : past + i + 1]).sum(1)
    assert Tk >= past + T
    return out


def update_traces(
    entries: list[dict[int, float]], S: Tensor, *, quota: int, threshold: float, retention: float, decay: float
) -> list[dict[int, float]]:
    """Per head a dict offset -> value; ``S (H, L)`` salience by offset."""
    out = []
    for h, mem in enumerate(entries):
        new: dict[int, float] = {}
        for d in range(S.shape[1]):
            s = float(S[h, d])
            m = mem.get(d, 0.0)
            if s > threshold:
                new[d] = retention * m + (1 - retention) * s
            elif m > 0:
                new[d] = decay * m
        for d, m in mem.items():  # entries beyond S's range only decay
            if d >= S.shape[1]:
                new[d] = decay * m
        kept = sorted(new.items(), key=lambda kv: -kv[1])[:quota]
        out.append({d: m for d, m in kept if m > 0})
    return out


def exact_salience(q: Tensor, k: Tensor, v: Tensor, loss_fn) -> Tensor:
    """Salience by offset ``(H, T)`` with the true ``|dL/dA_ij|`` in place of ``|v_j|``.

    ``A_ij * |dL/dA_ij|`` per link, aggregated by offset exactly like
    :func:`traces_crystallize.traces.aggregate_by_offset` (mean over queries, normalised
    per head, times recurrence). ``loss_fn(y (B, H, T, hd)) -> scalar``.
    """
    from traces_crystallize.traces import aggregate_by_offset

    B, H, T, hd = q.shape
    off = offsets_matrix(T, T, 0)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    A = logits.masked_fill(off < 0, float("-inf")).softmax(-1).detach().requires_grad_(True)  # (B, H, T, T)
    y = A @ v
    (grad,) = torch.autograd.grad(loss_fn(y), A)
    return aggregate_by_offset((A * grad.abs()).detach(), off, T)


def moe(x: Tensor, router_w: Tensor, w1: Tensor, w2: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Dense mixture: ``y = sum_e gate[e] * expert_e(x)``, gates = the top-k router probabilities.

    ``x (N, D)``, ``router_w (E, D)``, ``w1 (E, D, F)``, ``w2 (E, F, D)``. Returns ``(y, probs)``.
    """
    probs = (x @ router_w.t()).softmax(-1)  # (N, E)
    top_p, top_i = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_p)  # (N, E)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        y = y + gates[:, e : e + 1] * (F.gelu(x @ w1[e]) @ w2[e])
    return y, probs


def path_counts(paths: Tensor, max_len: int) -> Counter:
    """Counts of every segment ``(start, (e_start, ..., e_{start+m-1}))`` with ``1 <= m <= max_len``."""
    c: Counter = Counter()
    for row in paths.tolist():
        for s in range(len(row)):
            for m in range(1, max_len + 1):
                if s + m <= len(row):
                    c[(s, tuple(row[s : s + m]))] += 1
    return c
