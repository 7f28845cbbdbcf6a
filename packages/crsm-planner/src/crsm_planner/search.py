"""Batched PUCT search over a learned latent model, with the tree in preallocated tensors.

One search runs for ``B`` independent roots at once (the batch rows of a generation).
Every node of every tree lives in ``(B, max_nodes + 1, ...)`` tensors (the last slot is
scratch space for masked writes, never part of a tree); no Python object is made per
node, and a tree never grows past ``max_nodes`` (a full tree simply stops
expanding and keeps refining the visit counts of the nodes it has).

Nodes are evaluated when created: expanding a node takes the top-k tokens of its prior,
predicts the ``k`` child latents with the dynamics model in one batched call and scores
them with the value head. A simulation descends by PUCT,

    score(c) = Qn(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c)),

where ``Q(c)`` is the mean backed-up value (the child's own value estimate while
unvisited) and ``Qn`` is ``Q`` min-max normalised over the values seen in that row's
tree (values are losses of arbitrary scale), expands the leaf it reaches (if the depth
and the node budget allow) and backs the leaf's value up to the root.

With an ``edge_reward`` (MuZero's r(s, a): a weight times the token's log-probability under
its parent's prior, or a task's reward for the token), a node's value is the sum of the
rewards on the edges from the root down to it plus the value head's estimate there, so the
backed-up ``Q`` of a root child is a return, not only a state value.

The result is the most visited root child (ties broken by value), its latent, and a
confidence in ``[0, 1]``:

    concentration = (max_c pi(c) - 1/K) / (1 - 1/K)       pi = root visit distribution
    gap           = Q(best) - sum_{c != best} pi'(c) Q(c)   how much better the choice is than
                                                            the alternatives (pi' = pi over the
                                                            other children, renormalised; uniform
                                                            if none of them was visited)
    spread        = sqrt(Var[backed-up values under best] + predicted value variance)
    confidence    = concentration * gap / (gap + spread)

so a flat search (equal visits, equal values) or an uncertain value head gives ~0. (The
gap used to be taken against the visit-weighted mean of *all* children, best included:
``(1 - pi(best)) (Q(best) - Q(others))``, which vanishes as the visits concentrate, so the
product with ``concentration`` fell to 0 exactly when the search was most decided.)
The search is deterministic; its only randomness (optional Dirichlet noise on the root
priors) comes from the generator it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# z (M, L), tokens (M,) -> z' (M, L)
DynamicsFn = Callable[[Tensor, Tensor], Tensor]
# z (M, L) -> (value (M,), variance (M,)); higher value is better
ValueFn = Callable[[Tensor], tuple[Tensor, Tensor]]
# z (M, L) -> logits (M, V)
PriorFn = Callable[[Tensor], Tensor]
# log-probabilities (M, K) of the edges' tokens under their parent's prior, tokens (M, K) -> rewards (M, K)
EdgeRewardFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SearchResult:
    best_node: Tensor  # (B,) index of the chosen root child
    best_token: Tensor  # (B,)
    best_latent: Tensor  # (B, L)
    confidence: Tensor  # (B,)
    root_tokens: Tensor  # (B, K)
    root_visits: Tensor  # (B, K)
    root_q: Tensor  # (B, K)
    root_latents: Tensor  # (B, K, L) the root children's latents
    root_value: Tensor  # (B,) the root's mean backed-up value
    nodes_used: Tensor  # (B,)
    simulations: int


class PUCTSearch:
    """``PUCTSearch(...).run(z0 (B, L), root_logits (B, V), generator) -> SearchResult``."""

    def __init__(
        self,
        dynamics: DynamicsFn,
        value: ValueFn,
        prior: PriorFn,
        *,
        simulations: int = 32,
        depth: int = 4,
        c_puct: float = 1.5,
        top_k: int = 4,
        max_nodes: int = 256,
        root_noise: float = 0.0,
        edge_reward: EdgeRewardFn | None = None,
    ) -> None:
        if max_nodes < 1 + top_k:
            raise ValueError(f"max_nodes={max_nodes} cannot hold the root and its {top_k} children")
        self.dynamics, self.value, self.prior = dynamics, value, prior
        self.simulations, self.depth, self.c_puct = simulations, depth, c_puct
        self.top_k, self.max_nodes, self.root_noise = top_k, max_nodes, root_noise
        self.edge_reward = edge_reward

    # -- tree storage --------------------------------------------------------------
    def _alloc(self, B: int, L: int, device, dtype) -> None:
        N, K = self.max_nodes + 1, self.top_k  # slot max_nodes: scratch, written by masked expansions, never read
        f = dict(device=device, dtype=torch.float32)
        i = dict(device=device, dtype=torch.long)
        self.latent = torch.zeros(B, N, L, device=device, dtype=dtype)
        self.parent = torch.full((B, N), -1, **i)
        self.token = torch.zeros(B, N, **i)
        self.prior_p = torch.zeros(B, N, **f)
        self.node_depth = torch.zeros(B, N, **i)
        self.visits = torch.zeros(B, N, **f)
        self.wsum = torch.zeros(B, N, **f)
        self.wsq = torch.zeros(B, N, **f)
        self.v0 = torch.zeros(B, N, **f)
        self.var0 = torch.zeros(B, N, **f)
        self.ret = torch.zeros(B, N, **f)  # edge rewards summed from the root down to the node
        self.children = torch.full((B, N, K), -1, **i)
        self.n_used = torch.ones(B, **i)
        self.vmin = torch.full((B,), float("inf"), **f)
        self.vmax = torch.full((B,), float("-inf"), **f)
        self.rows = torch.arange(B, device=device)

    def _expand(self, nodes: Tensor, logits: Tensor, mask: Tensor, noise: Tensor | None = None) -> None:
        """Create the top-k children of ``nodes (B,)`` in the rows where ``mask (B,)`` holds
        (``logits (B, V)`` are their priors). Written without host synchronisation so that a
        whole search can be captured as one CUDA graph: every row computes, and masked rows
        write their new nodes into the scratch slot ``max_nodes``, which no node points to."""
        B, K, rows = nodes.shape[0], self.top_k, self.rows
        top_logits, top_tok = logits.float().topk(K, dim=-1)  # (B, K)
        p = torch.softmax(top_logits, dim=-1)  # (B, K) renormalised over the top-k
        if noise is not None:
            p = (1 - self.root_noise) * p + self.root_noise * noise
        z = self.latent[rows, nodes]  # (B, L)
        zk = z.unsqueeze(1).expand(B, K, z.shape[-1]).reshape(B * K, -1)  # (B*K, L)
        zc = self.dynamics(zk, top_tok.reshape(B * K))  # (B*K, L)
        v, var = self.value(zc)  # (B*K,)
        v, var = v.view(B, K).float(), var.view(B, K).float()
        ret = self.ret[rows, nodes].unsqueeze(1).expand(B, K)  # (B, K)
        if self.edge_reward is not None:
            logp = logits.float().log_softmax(dim=-1).gather(1, top_tok)  # (B, K) under the full prior
            ret = ret + self.edge_reward(logp, top_tok).float()
        v = v + ret  # a node's value: the rewards on the way to it plus the value head's estimate there
        idx = (self.n_used.unsqueeze(1) + torch.arange(K, device=nodes.device)).clamp_max(self.max_nodes - 1)  # (B, K)
        rr = rows.unsqueeze(1).expand(B, K)  # (B, K)
        m = mask.unsqueeze(1)  # (B, 1)
        slot = torch.where(m, idx, self.max_nodes)  # (B, K): masked rows write to the scratch slot

        def put(buf: Tensor, new: Tensor) -> None:
            buf[rr, slot] = new.to(buf.dtype)

        put(self.latent, zc.view(B, K, -1))
        put(self.parent, nodes.unsqueeze(1).expand(B, K))
        put(self.token, top_tok)
        put(self.prior_p, p)
        put(self.node_depth, (self.node_depth[rows, nodes] + 1).unsqueeze(1).expand(B, K))
        put(self.v0, v)
        put(self.var0, var)
        put(self.ret, ret)
        self.children[rows, nodes] = torch.where(m, idx, self.children[rows, nodes])
        self.n_used += K * mask.long()
        self.vmin = torch.where(mask, torch.minimum(self.vmin, v.min(dim=1).values), self.vmin)
        self.vmax = torch.where(mask, torch.maximum(self.vmax, v.max(dim=1).values), self.vmax)

    # -- search --------------------------------------------------------------------
    @torch.no_grad()
    def run(self, z0: Tensor, root_logits: Tensor, generator: torch.Generator | None = None,
            noise: Tensor | None = None) -> SearchResult:
        """Search from latents ``z0 (B, L)`` with root priors from ``root_logits (B, V)``.
        Root noise (if ``root_noise > 0``) is drawn from ``generator`` unless given as ``noise (B, K)``."""
        B, L = z0.shape
        dev = z0.device
        self._alloc(B, L, dev, z0.dtype)
        root = torch.zeros(B, dtype=torch.long, device=dev)
        self.latent[:, 0] = z0
        v_root, var_root = self.value(z0)
        self.v0[:, 0], self.var0[:, 0] = v_root.float(), var_root.float()
        self.vmin, self.vmax = v_root.float().clone(), v_root.float().clone()
        if self.root_noise > 0 and noise is None:
            noise = self.sample_noise(B, generator).to(dev)
        everywhere = torch.ones(B, dtype=torch.bool, device=dev)
        self._expand(root, root_logits, everywhere, noise if self.root_noise > 0 else None)
        for _ in range(self.simulations):
            self._simulate(root)
        return self._result()

    def sample_noise(self, B: int, generator: torch.Generator | None = None) -> Tensor:
        """Dirichlet(0.3) noise for the root priors ``(B, K)`` (on the CPU, from ``generator``)."""
        conc = torch.full((B, self.top_k), 0.3)
        g = torch._standard_gamma(conc, generator=generator) if generator is not None else torch._standard_gamma(conc)
        return g / g.sum(dim=1, keepdim=True)

    def _simulate(self, root: Tensor) -> None:
        rows = self.rows
        node = root.clone()
        path = [node]
        # Visit counts, values and bounds do not change during the descent, so each node's terms
        # of the PUCT score are computed once per simulation for the whole tree (B, max_nodes)
        # and only gathered per level: half the kernels of computing them per level, and the
        # same arithmetic in the same order (bit-identical scores).
        n = self.visits  # (B, N)
        q = torch.where(n > 0, self.wsum / n.clamp_min(1), self.v0)  # (B, N) mean backed-up value
        qn = (q - self.vmin[:, None]) / (self.vmax - self.vmin).clamp_min(1e-8)[:, None]  # (B, N)
        cp = self.c_puct * self.prior_p  # (B, N)
        den = 1.0 + n  # (B, N)
        sqrt_n = n.clamp_min(1.0).sqrt()  # (B, N) as a parent
        for _d in range(self.depth):  # descend by PUCT while the node has children
            ch = self.children[rows, node]  # (B, K)
            expanded = ch[:, 0] >= 0  # (B,)
            chs = ch.clamp_min(0)
            score = qn.gather(1, chs) + cp.gather(1, chs) * sqrt_n[rows, node][:, None] / den.gather(1, chs)  # (B, K)
            pick = chs.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)  # (B,)
            node = torch.where(expanded, pick, node)
            path.append(node)
        # expand the leaves that may grow (depth and node budget permitting)
        can = (self.children[rows, node, 0] < 0) & (self.node_depth[rows, node] < self.depth) & (
            self.n_used + self.top_k <= self.max_nodes)
        self._expand(node, self.prior(self.latent[rows, node]), can)
        # back the leaf's value up along the path, root to leaf, in one scatter per statistic
        P = torch.stack(path, dim=1)  # (B, depth+1); a row that stopped early repeats its leaf
        w = torch.cat([torch.ones_like(P[:, :1]), (P[:, 1:] != P[:, :-1]).long()], dim=1).float()  # (B, depth+1)
        v = self.v0[rows, node].unsqueeze(1)  # (B, 1)
        self.visits.scatter_add_(1, P, w)
        self.wsum.scatter_add_(1, P, w * v)
        self.wsq.scatter_add_(1, P, w * v * v)

    def _result(self) -> SearchResult:
        rows, K = self.rows, self.top_k
        ch = self.children[:, 0]  # (B, K)
        n_c = self.visits.gather(1, ch)  # (B, K)
        w_c = self.wsum.gather(1, ch)
        q_c = torch.where(n_c > 0, w_c / n_c.clamp_min(1), self.v0.gather(1, ch))  # (B, K)
        qn = (q_c - self.vmin[:, None]) / (self.vmax - self.vmin).clamp_min(1e-8)[:, None]
        best_k = (n_c + 1e-3 * qn).argmax(dim=1)  # (B,) most visited, ties by value
        best = ch.gather(1, best_k[:, None]).squeeze(1)  # (B,)
        pi = n_c / n_c.sum(dim=1, keepdim=True).clamp_min(1)  # (B, K)
        concentration = ((pi.max(dim=1).values - 1.0 / K) / (1.0 - 1.0 / K)).clamp(0, 1)
        q_best = q_c.gather(1, best_k[:, None]).squeeze(1)
        others = torch.ones_like(pi).scatter_(1, best_k[:, None], 0.0)  # (B, K): 1 except at the choice
        w = pi * others
        w_sum = w.sum(dim=1, keepdim=True)
        w = torch.where(w_sum > 0, w / w_sum.clamp_min(1e-12), others / (K - 1))  # (B, K) over the alternatives
        gap = (q_best - (w * q_c).sum(dim=1)).clamp_min(0)
        n_b = self.visits[rows, best].clamp_min(1)
        var_backed = (self.wsq[rows, best] / n_b - (self.wsum[rows, best] / n_b).pow(2)).clamp_min(0)
        spread = (var_backed + self.var0[rows, best]).sqrt()
        confidence = (concentration * gap / (gap + spread + 1e-8)).clamp(0, 1)
        return SearchResult(
            best_node=best,
            best_token=self.token[rows, best],
            best_latent=self.latent[rows, best],
            confidence=confidence,
            root_tokens=self.token.gather(1, ch),
            root_visits=n_c,
            root_q=q_c,
            root_latents=self.latent[rows.unsqueeze(1), ch],
            root_value=self.wsum[:, 0] / self.visits[:, 0].clamp_min(1),
            nodes_used=self.n_used.clone(),
            simulations=self.simulations,
        )
