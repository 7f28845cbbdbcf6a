"""Slow, obviously-correct references: one token at a time, written as the math reads.

These define the semantics. The fast forms (chunked Hebbian, chunked episodic, parallel
linear scan) are tested against them on random inputs, and the memories' ``step``
methods call the one-step functions here directly.

Hebbian memory, per head (gamma, eta scalars per head; q_hat, k_hat unit vectors; w_t in
[0, 1] the optional per-token write strength, 1 without a write gate)::

    H_t = gamma * H_{t-1} + eta * w_t * k_hat_t v_t^T    (d x d)
    r_t = topk(q_hat_t^T H_t / temperature)              (d,)

The options of the Hebbian memory (delta rule, per-token decay) generalise the write: see
:func:`memory_step`.

Episodic buffer, per batch row: ``S`` slots of (key k_hat, value v, importance z, write
time s). The priority of a slot at any time is ``u = z + recency * s`` (a constant
``recency * t`` offset is common to all slots, so only the ordering matters). One step::

    1. the new entry (k_hat_t, v_t, z_t, t) replaces the lowest-priority slot (ties: the
       oldest) if its priority is at least that slot's (empty slots have priority -inf);
    2. slots are kept in canonical order: priority descending, newest first among equals;
    3. recall attends over the filled slots (optionally only those written in the last
       ``window`` steps, optionally only the ``topk`` best logits) with
       logits = q_hat_t . k_hat_s / temperature + log sigmoid(z_s);
       no eligible slot gives a zero recall.

Because every slot ages at the same rate, the buffer after step t holds exactly the S
highest-priority entries seen so far; this is what lets the fast form compute the
buffer's contents at every step of a chunk at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def unit(x: Tensor) -> Tensor:
    """``x / max(|x|, EPS)`` over the last dim: zero vectors stay zero (no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def topk_magnitude(r: Tensor, k: int | None) -> Tensor:
    """Zero all but the ``k`` largest-magnitude entries of the last dim (``None``: keep all)."""
    if k is None or k >= r.shape[-1]:
        return r
    idx = r.abs().topk(k, dim=-1).indices
    keep = torch.zeros_like(r, dtype=torch.bool).scatter_(-1, idx, True)
    return r * keep


def masked_softmax(logits: Tensor, valid: Tensor, topk: int | None) -> Tensor:
    """Softmax over the last dim restricted to ``valid`` (and to its ``topk`` largest logits).

    Rows with no valid entry get all-zero weights instead of NaN.
    """
    logits = logits.masked_fill(~valid, float("-inf"))
    if topk is not None and topk < logits.shape[-1]:
        thr = logits.topk(topk, dim=-1).values[..., -1:]
        valid = valid & (logits >= thr)
        logits = logits.masked_fill(~valid, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(logits - m) * valid
    return e / e.sum(dim=-1, keepdim=True).clamp_min(1e-30)


# ---------------------------------------------------------------------------------------
# Hebbian


def hebbian_step(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, gamma: Tensor, eta: Tensor, temperature: float, topk: int | None,
    w: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token. ``q, k`` unit vectors and ``v`` of shape (B, heads, d); ``H`` (B, heads, d, d);
    ``gamma, eta`` (heads,); ``w`` (B, heads) write strengths or None (all 1). Returns
    ``(r (B, heads, d), H_t)``."""
    rate = eta[:, None, None] if w is None else eta[:, None, None] * w[..., None, None]  # (h, 1, 1) or (B, h, 1, 1)
    H = gamma[:, None, None] * H + rate * (k.unsqueeze(-1) * v.unsqueeze(-2))  # (B, h, d, d)
    r = torch.einsum("bhk,bhkv->bhv", q, H) / temperature
    return topk_magnitude(r, topk), H


def hebbian_sequence(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, gamma: Tensor, eta: Tensor, temperature: float, topk: int | None,
    w: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The whole sequence, token by token: ``q, k, v`` (B, heads, T, d) -> ``r`` (B, heads, T, d);
    ``w`` (B, heads, T) or None."""
    rs = []
    for t in range(q.shape[2]):
        wt = None if w is None else w[:, :, t]
        r, H = hebbian_step(q[:, :, t], k[:, :, t], v[:, :, t], H, gamma, eta, temperature, topk, wt)
        rs.append(r)
    return torch.stack(rs, dim=2), H


def memory_step(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, log_a: Tensor, beta: Tensor, delta: bool, temperature: float,
    topk: int | None,
) -> tuple[Tensor, Tensor]:
    """One token of the general write (the options of the Hebbian memory). ``q, k`` unit vectors
    and ``v`` (B, heads, d); ``H`` (B, heads, d, d); ``log_a`` the log decay and ``beta`` the
    write strength, each broadcastable to (B, heads). Returns ``(r (B, heads, d), H_t)``::

        H <- a_t H
        H <- H + beta_t k_t (v_t - H^T k_t)^T    (delta rule: replace what k_t recalls)
        H <- H + beta_t k_t v_t^T                 (Hebbian: add)
        r  = topk(q_t^T H / temperature)

    With ``log_a = log gamma`` per head and ``beta = eta w_t`` the Hebbian form is
    :func:`hebbian_step`."""
    a = torch.exp(log_a).expand(H.shape[:2])[..., None, None]  # (B, h, 1, 1)
    beta = beta.expand(H.shape[:2])[..., None]  # (B, h, 1)
    H = a * H
    new = v - torch.einsum("bhk,bhkv->bhv", k, H) if delta else v  # (B, h, d)
    H = H + k.unsqueeze(-1) * (beta * new).unsqueeze(-2)
    r = torch.einsum("bhk,bhkv->bhv", q, H) / temperature
    return topk_magnitude(r, topk), H


def memory_sequence(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, log_a: Tensor, beta: Tensor, delta: bool, temperature: float,
    topk: int | None,
) -> tuple[Tensor, Tensor]:
    """:func:`memory_step` token by token: ``q, k, v`` (B, heads, T, d), ``log_a, beta``
    broadcastable to (B, heads, T) -> ``r`` (B, heads, T, d), ``H_T``."""
    B, h, T, _ = q.shape
    log_a, beta = log_a.expand(B, h, T), beta.expand(B, h, T)
    rs = []
    for t in range(T):
        r, H = memory_step(q[:, :, t], k[:, :, t], v[:, :, t], H, log_a[:, :, t], beta[:, :, t], delta,
                           temperature, topk)
        rs.append(r)
    return torch.stack(rs, dim=2), H


def causal_conv_sequence(x: Tensor, weight: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution token by token: ``y_t = sum_i weight[:, i] x_{t-K+1+i}``.

    ``x`` (B, T, C); ``weight`` (C, K); ``past`` (B, K-1, C) the inputs before ``x`` (zeros at
    the start). Returns ``(y (B, T, C), the last K-1 inputs)``."""
    window = past
    ys = []
    for t in range(x.shape[1]):
        window = torch.cat([window, x[:, t : t + 1]], dim=1)  # (B, K, C)
        ys.append(torch.einsum("bkc,ck->bc", window, weight))
        window = window[:, 1:]
    return torch.stack(ys, dim=1), window


# ---------------------------------------------------------------------------------------
# Episodic


def slot_priority(prio: Tensor, slot_t: Tensor, recency: float) -> Tensor:
    """Priority ``u = z + recency * s`` of each slot; empty slots (z = -inf) stay -inf."""
    return prio + recency * slot_t.to(prio.dtype)


def sort_slots(
    keys: Tensor, values: Tensor, prio: Tensor, slot_t: Tensor, recency: float, keep: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Canonical slot order (priority descending, newest first among equals), first ``keep``.

    ``keys, values`` (B, N, d); ``prio`` (B, N); ``slot_t`` (B, N) int.
    """
    by_time = torch.argsort(slot_t, dim=1, descending=True, stable=True)  # (B, N)
    u = slot_priority(prio, slot_t, recency).gather(1, by_time)
    by_prio = torch.argsort(u, dim=1, descending=True, stable=True)
    order = by_time.gather(1, by_prio)[:, :keep]  # (B, keep)
    d = keys.shape[-1]
    return (
        keys.gather(1, order.unsqueeze(-1).expand(-1, -1, d)),
        values.gather(1, order.unsqueeze(-1).expand(-1, -1, values.shape[-1])),
        prio.gather(1, order),
        slot_t.gather(1, order),
    )


def episodic_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    z: Tensor,
    state: dict[str, Tensor],
    *,
    temperature: float,
    topk: int | None,
    window: int | None,
    recency: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One token. ``q, k`` unit vectors (B, d), ``v`` (B, d), importance ``z`` (B,).

    ``state``: ``keys, values`` (B, S, d), ``prio`` (B, S) (-inf = empty), ``slot_t`` (B, S)
    (write time, -1 = empty), ``t`` (B,) (time of this token). Returns ``(r (B, d), state)``.
    """
    keys, values, prio, slot_t, t = state["keys"], state["values"], state["prio"], state["slot_t"], state["t"]
    S = keys.shape[1]
    # 1. the lowest-priority slot: smallest u, ties -> oldest write
    u = slot_priority(prio, slot_t, recency)  # (B, S)
    u_min = u.min(dim=1, keepdim=True).values
    oldest = torch.where(u == u_min, slot_t, torch.full_like(slot_t, torch.iinfo(slot_t.dtype).max))
    m = oldest.argmin(dim=1)  # (B,)
    u_new = z + recency * t.to(z.dtype)  # (B,)
    write = u_new >= u_min.squeeze(1)  # the new entry is newer, so it wins ties
    hit = F.one_hot(m, S).bool() & write.unsqueeze(1)  # (B, S)
    keys = torch.where(hit.unsqueeze(-1), k.unsqueeze(1), keys)
    values = torch.where(hit.unsqueeze(-1), v.unsqueeze(1), values)
    prio = torch.where(hit, z.unsqueeze(1), prio)
    slot_t = torch.where(hit, t.unsqueeze(1), slot_t)
    # 2. canonical order
    keys, values, prio, slot_t = sort_slots(keys, values, prio, slot_t, recency, S)
    # 3. recall
    valid = torch.isfinite(slot_priority(prio, slot_t, recency))  # (B, S)
    if window is not None:
        valid = valid & ((t.unsqueeze(1) - slot_t) < window)
    logits = torch.einsum("bd,bsd->bs", q, keys) / temperature + F.logsigmoid(prio)
    a = masked_softmax(logits, valid, topk)  # (B, S)
    r = torch.einsum("bs,bsd->bd", a, values)
    return r, {"keys": keys, "values": values, "prio": prio, "slot_t": slot_t, "t": t + 1}


def episodic_sequence(
    q: Tensor, k: Tensor, v: Tensor, z: Tensor, state: dict[str, Tensor], **kw
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole sequence, token by token: ``q, k, v`` (B, T, d), ``z`` (B, T) -> ``r`` (B, T, d)."""
    rs = []
    for t in range(q.shape[1]):
        r, state = episodic_step(q[:, t], k[:, t], v[:, t], z[:, t], state, **kw)
        rs.append(r)
    return torch.stack(rs, dim=1), state


# ---------------------------------------------------------------------------------------
# linear recurrence


def linear_recurrence(a: Tensor, b: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """``h_t = a_t * h_{t-1} + b_t`` token by token; ``a, b`` (B, T, D) (``a`` may broadcast),
    ``h0`` (B, D). Returns ``(h (B, T, D), h_T)``."""
    a = a.expand_as(b)
    hs = []
    h = h0
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1), h
