"""Episodic buffer: ``slots`` entries of (key, value, priority) per row, cosine recall.

Config (``EpisodicParams`` in plugin.py): ``slots``, ``d_key``, ``temperature``, ``topk``,
``window``, ``recency``, ``detach``, ``chunk_size``.

Per-step semantics are defined in reference.py (:func:`~crsd_memory.reference.episodic_step`):
each token's (key, value, importance) replaces the lowest-priority slot when its priority
is at least that slot's, and recall attends over the filled slots. Since all slots age at
the same rate, the buffer after token t is the set of the S highest-priority entries among
the incoming slots and tokens ``<= t``. The fast form uses that to process a chunk of C
tokens at once: among the N = S + C candidates (incoming slots, then the chunk's tokens),
candidate j is in the buffer at chunk step tau iff it has been seen (j <= tau) and fewer
than S seen candidates beat it::

    beats[j, i] = u_i > u_j  or  (u_i == u_j and s_i > s_j)      (B, N, N)
    rank[j, tau] = sum_i beats[j, i] * seen[i, tau]              (B, N, C)  one matmul
    alive[tau, j] = seen[j, tau] and rank[j, tau] < S

then recall is one masked attention (B, C, N) and the outgoing slots are the top S
candidates in canonical order. Membership is decided by the same comparisons as the
reference, so the buffer contents match it exactly; outputs match to fp32 rounding.

Learned eviction (``eviction: straight-through``). Which entries stay is a hard top-S
choice, so the importance logits get no gradient from it: an entry evicted too early never
tells the importance head it was needed. The straight-through form keeps the forward pass
exactly the hard one and takes the gradient from a soft buffer: at chunk step tau, with
``theta`` the midpoint between the S-th and (S+1)-th highest priorities seen so far (no
eviction yet: theta = -inf), every seen candidate j is kept with probability
``p_j = sigmoid((u_j - theta) / eviction_temperature)`` and recall attends over all seen
candidates with logits ``+ log p_j``; the recall weights are ``a_hard + a_soft -
stop_gradient(a_soft)``. Raising an evicted entry's importance now lowers the loss when
that entry would have been recalled, which is what teaches the buffer what to keep. The soft
buffer spans one chunk's candidates (the incoming slots and the chunk's tokens): an entry
evicted in an earlier chunk gets no gradient from later queries, so ``chunk_size`` is the
horizon of the learned eviction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab.interfaces import State

from crsd_memory.gated import GatedRecallMemory
from crsd_memory.reference import episodic_step, masked_softmax, slot_priority, sort_slots, unit

STATE_KEYS = ("keys", "values", "prio", "slot_t", "t")


def episodic_chunked(
    q: Tensor, k: Tensor, v: Tensor, z: Tensor, state: State, *, chunk_size: int, temperature: float,
    topk: int | None, window: int | None, recency: float, evict_temperature: float | None = None,
) -> tuple[Tensor, State]:
    """The chunk-parallel form of :func:`crsd_memory.reference.episodic_sequence` (same arguments
    and results): ``q, k`` unit vectors and ``v`` (B, T, d), importance ``z`` (B, T).
    ``evict_temperature``: straight-through gradient for the eviction (same values), or None."""
    keys, values, prio, slot_t, t = (state[key] for key in STATE_KEYS)
    S = keys.shape[1]
    outs = []
    for c0 in range(0, q.shape[1], chunk_size):
        qc, kc, vc, zc = (a[:, c0 : c0 + chunk_size] for a in (q, k, v, z))
        C = qc.shape[1]
        N = S + C
        tc = t[:, None] + torch.arange(C, device=q.device)  # (B, C) token times
        ck = torch.cat([keys, kc], dim=1)  # (B, N, d) candidates: incoming slots, then the chunk
        cv = torch.cat([values, vc], dim=1)  # (B, N, d)
        cz = torch.cat([prio, zc], dim=1)  # (B, N)
        ct = torch.cat([slot_t, tc], dim=1)  # (B, N)
        u = slot_priority(cz, ct, recency)  # (B, N)
        beats = (u[:, None, :] > u[:, :, None]) | (
            (u[:, None, :] == u[:, :, None]) & (ct[:, None, :] > ct[:, :, None])
        )  # (B, N_j, N_i): i beats j
        seen = torch.ones(N, C, device=q.device)  # (N, C) candidate i seen by chunk step tau
        seen[S:] = torch.tril(torch.ones(C, C, device=q.device)).T  # token c seen iff c <= tau
        rank = beats.float() @ seen  # (B, N, C) exact small integers
        alive = (rank < S) & (seen > 0) & torch.isfinite(u)[:, :, None]  # (B, N, C)
        alive = alive.transpose(1, 2)  # (B, C, N)
        in_window = torch.ones_like(alive)
        if window is not None:
            in_window = (tc[:, :, None] - ct[:, None, :]) < window  # (B, C, N)
            alive = alive & in_window
        logits = (qc @ ck.transpose(1, 2)) / temperature + F.logsigmoid(cz)[:, None, :]  # (B, C, N)
        a = masked_softmax(logits, alive, topk)  # (B, C, N)
        if evict_temperature is not None:
            a = a + _soft_buffer_weights(logits, u, seen, S, in_window, topk, evict_temperature)
        outs.append(a @ cv)  # (B, C, d)
        keys, values, prio, slot_t = sort_slots(ck, cv, cz, ct, recency, S)
        t = t + C
    new = {"keys": keys, "values": values, "prio": prio, "slot_t": slot_t, "t": t}
    return torch.cat(outs, dim=1), new


def _soft_buffer_weights(
    logits: Tensor, u: Tensor, seen: Tensor, S: int, in_window: Tensor, topk: int | None, tau: float
) -> Tensor:
    """``a_soft - stop_gradient(a_soft)`` (zero in value): the soft buffer's recall weights.

    ``logits`` (B, C, N); ``u`` (B, N) candidate priorities; ``seen`` (N, C); ``in_window``
    (B, C, N). Each seen candidate is kept with probability sigmoid((u_j - theta) / tau)."""
    valid = (seen.T > 0)[None] & torch.isfinite(u)[:, None, :] & in_window  # (B, C, N)
    u_seen = u[:, None, :].detach().masked_fill(~valid, float("-inf"))  # (B, C, N)
    if u.shape[1] <= S:  # fewer candidates than slots: nothing is ever evicted
        return torch.zeros_like(logits)
    top = u_seen.topk(S + 1, dim=-1).values  # (B, C, S+1)
    theta = (top[..., S - 1] + top[..., S]) / 2  # (B, C); -inf while at most S are seen
    margin = (u[:, None, :] - theta[..., None]) / tau  # (B, C, N)
    log_keep = F.logsigmoid(margin.masked_fill(~valid, 0.0))
    a_soft = masked_softmax(logits + log_keep, valid, topk)
    return a_soft - a_soft.detach()


class EpisodicRecall(nn.Module):
    """The buffer itself, without the residual: ``x (B, T, d_in) -> recall (B, T, d_out)``.

    State: ``keys, values`` (B, S, d_key) fp32, ``prio`` (B, S) fp32 (importance logit,
    -inf = empty), ``slot_t`` (B, S) int64 (write time, -1 = empty), ``t`` (B,) int64
    (tokens seen).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        slots: int = 32,
        d_key: int | None = None,
        temperature: float = 0.1,
        topk: int | None = None,
        window: int | None = None,
        recency: float = 0.01,
        detach: bool = False,
        chunk_size: int = 64,
        eviction: str = "hard",
        eviction_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if eviction not in ("hard", "straight-through"):
            raise ValueError(f"episodic: eviction must be hard or straight-through (got {eviction!r})")
        self.evict_temperature = eviction_temperature if eviction == "straight-through" else None
        self.slots, self.d_key = slots, d_key or d_in
        self.temperature, self.topk, self.window, self.recency = temperature, topk, window, recency
        self.detach, self.chunk_size = detach, chunk_size
        self.qkv = nn.Linear(d_in, 3 * self.d_key, bias=False)
        self.importance = nn.Linear(d_in, 1)
        self.out = nn.Linear(self.d_key, d_out, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        S, d = self.slots, self.d_key
        return {
            "keys": torch.zeros(batch_size, S, d, device=device),
            "values": torch.zeros(batch_size, S, d, device=device),
            "prio": torch.full((batch_size, S), float("-inf"), device=device),
            "slot_t": torch.full((batch_size, S), -1, device=device, dtype=torch.long),
            "t": torch.zeros(batch_size, device=device, dtype=torch.long),
        }

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, T, d_in) -> unit q, unit k, v (B, T, d_key) and importance z (B, T), fp32."""
        q, k, v = self.qkv(x).float().chunk(3, dim=-1)  # (B, T, d) each
        z = self.importance(x).float().squeeze(-1)  # (B, T)
        q, k = unit(q), unit(k)
        if self.detach:
            k, v, z = k.detach(), v.detach(), z.detach()
        return q, k, v, z

    def _state(self, state: State | None, B: int, device) -> State:
        s = dict(state) if state else self.init_state(B, device)
        if self.detach:
            s = {k: v.detach() for k, v in s.items()}
        return s

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        s = self._state(state, x.shape[0], x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, z = self._project(x)
            r, new = episodic_chunked(q, k, v, z, s, chunk_size=self.chunk_size, temperature=self.temperature,
                                      topk=self.topk, window=self.window, recency=self.recency,
                                      evict_temperature=self.evict_temperature)
        return self.out(r.to(x.dtype)), new

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        s = self._state(state, x_t.shape[0], x_t.device)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            q, k, v, z = (a[:, 0] for a in self._project(x_t.unsqueeze(1)))  # (B, d) / (B,)
            r, new = episodic_step(
                q, k, v, z, s, temperature=self.temperature, topk=self.topk, window=self.window, recency=self.recency
            )
        return self.out(r.to(x_t.dtype)), new


class EpisodicMemory(GatedRecallMemory):
    """``h_out = h + g * recall`` with ``recall = EpisodicRecall(LayerNorm(h))`` and a
    per-channel gate ``g = sigmoid(W_g LayerNorm(h))``. Publishes ``memory.recall`` and
    ``memory.gate``. State: see :class:`EpisodicRecall`."""

    def __init__(self, d_model: int, **kw) -> None:
        super().__init__(d_model, EpisodicRecall(d_model, d_model, **kw))


def episodic_kwargs(params) -> dict:
    return dict(
        slots=params.slots, d_key=params.d_key, temperature=params.temperature, topk=params.topk,
        window=params.window, recency=params.recency, detach=params.detach, chunk_size=params.chunk_size,
        eviction=params.eviction, eviction_temperature=params.eviction_temperature,
    )


def build(params, ctx) -> EpisodicMemory:
    return EpisodicMemory(ctx.d_model, **episodic_kwargs(params))
