"""Mixture-of-experts feed-forward with a top-k router, motif serving and expert freezing.

Routing: ``p = softmax(W_r x)`` over ``E`` experts; a token goes to its ``top_k`` experts with
gates equal to their (un-renormalised) probabilities, Switch/GShard style, so the router
always gets a gradient. Experts are ``gelu(x W1[e]) W2[e]`` (no biases).

Motif serving: a token matched to a crystallized motif at this layer (``serve[n] = e``) is
sent to expert ``e`` alone, with gate ``sum(top-k probabilities)`` (the same total gate mass
as a routed token); it skips the ``top_k - 1`` other experts, which is the FLOP saving.

Re-routed control (utility measurement): ``reroute=True`` drops each token's first choice
and uses choices ``2..top_k+1`` instead.

Crystallized experts (``crystal[e]``: on an active motif). With ``hard_freeze`` they are
frozen exactly: a hook masks their gradients, and :meth:`restore_frozen` (run at every
training forward) copies back the weights snapshotted at freezing, undoing any drift from
weight decay or optimiser momentum. Without it they stay trainable and the ``ewc``
regularizer anchors them softly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoE(nn.Module):
    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int, n_layers: int) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, d_model) * (0.02 / math.sqrt(2 * n_layers)))
        self.register_buffer("crystal", torch.zeros(n_experts, dtype=torch.bool))
        self.hard_freeze = True
        self.n_frozen = 0  # experts frozen now (python side; anchors are re-taken after a load)
        self._anchors: dict[int, tuple[Tensor, Tensor]] = {}
        self.expert_calls = 0  # token-expert evaluations since the last reset (counted when counting is on)
        self.routed_tokens = 0
        self.counting = False
        self.w1.register_hook(self._mask_grad)
        self.w2.register_hook(self._mask_grad)
        self.register_load_state_dict_post_hook(lambda module, _: module.sync())

    def sync(self) -> None:
        self._anchors = {}
        if self.hard_freeze:
            for e in self.crystal.nonzero().flatten().tolist():
                self._anchors[e] = (self.w1.detach()[e].clone(), self.w2.detach()[e].clone())
        self.n_frozen = len(self._anchors)

    def set_crystal(self, expert: int, value: bool) -> None:
        """Mark an expert as on (or off) an active motif; freezes (unfreezes) it with ``hard_freeze``."""
        self.crystal[expert] = value
        if value and self.hard_freeze and expert not in self._anchors:
            self._anchors[expert] = (self.w1.detach()[expert].clone(), self.w2.detach()[expert].clone())
        if not value:
            self._anchors.pop(expert, None)
        self.n_frozen = len(self._anchors)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for e, (a1, a2) in self._anchors.items():
            self.w1[e].copy_(a1)
            self.w2[e].copy_(a2)

    def frozen_mask(self) -> Tensor:
        m = torch.zeros(self.n_experts, dtype=torch.bool, device=self.w1.device)
        if self._anchors:
            m[list(self._anchors)] = True
        return m

    def _mask_grad(self, g: Tensor) -> Tensor:
        if self.n_frozen == 0:
            return g
        return g * (~self.frozen_mask()).to(g.dtype).view(-1, 1, 1)  # (E, 1, 1)

    def probs(self, x: Tensor) -> Tensor:
        """Router probabilities ``(N, E)`` in float32 for tokens ``x (N, D)``."""
        return self.router(x).float().softmax(-1)

    def dispatch(self, x: Tensor, probs: Tensor, serve: Tensor | None = None, reroute: bool = False) -> tuple[Tensor, Tensor]:
        """Mix the experts: ``x (N, D)``, ``probs (N, E)``, ``serve (N,)`` (-1 = route).
        Returns ``y (N, D)`` and the experts used ``idx (N, top_k)`` (-1 = unused slot)."""
        k = self.top_k
        if reroute:
            gate, idx = probs.topk(min(k + 1, self.n_experts), dim=-1)
            gate, idx = gate[:, -k:], idx[:, -k:]  # (N, k): choices 2..k+1
        else:
            gate, idx = probs.topk(k, dim=-1)  # (N, k)
        if serve is not None:
            served = serve >= 0  # (N,)
            if k > 1:
                total = gate.sum(-1)
                rest = torch.full_like(idx[:, 1:], -1)
                idx = torch.where(served[:, None], torch.cat([serve[:, None], rest], 1), idx)
                gate = torch.where(served[:, None], torch.cat([total[:, None], torch.zeros_like(gate[:, 1:])], 1), gate)
            else:
                idx = torch.where(served[:, None], serve[:, None], idx)
        y: Tensor | None = None  # allocated with the experts' output dtype (bf16 under autocast)
        flat = idx.reshape(-1)  # (N * k,)
        for e in range(self.n_experts):
            pos = (flat == e).nonzero().squeeze(1)  # positions in (N * k)
            if pos.numel() == 0:
                continue
            rows = pos // k
            h = F.gelu(x[rows] @ self.w1[e].to(x.dtype)) @ self.w2[e].to(x.dtype)  # (n_e, D)
            if y is None:
                y = torch.zeros(x.shape[0], x.shape[1], dtype=h.dtype, device=x.device)
            y.index_add_(0, rows, h * gate.reshape(-1)[pos, None].to(h.dtype))
        if y is None:
            y = torch.zeros_like(x)
        if self.counting:
            self.expert_calls += int((idx >= 0).sum())
            self.routed_tokens += x.shape[0]
        return y, idx

    def forward(self, x: Tensor) -> Tensor:
        """Plain use outside a backbone: ``x (N, D)`` -> ``y (N, D)``."""
        return self.dispatch(x, self.probs(x))[0]
