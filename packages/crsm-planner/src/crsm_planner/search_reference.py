"""A slow, obviously-correct PUCT search for one root, with one Python object per node.

The same rules as :class:`crsm_planner.search.PUCTSearch` (see its docstring), written
for reading rather than speed; the tests check that both give the same visit counts,
values, choice and confidence on random models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Node:
    latent: Tensor  # (L,)
    token: int
    prior: float
    depth: int
    value: float  # value-head estimate when created
    var: float
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    wsum: float = 0.0
    wsq: float = 0.0
    ret: float = 0.0  # edge rewards from the root down to this node

    def q(self) -> float:
        return self.wsum / self.visits if self.visits else self.value


def reference_search(dynamics, value, prior, z0: Tensor, root_logits: Tensor, *, simulations: int, depth: int,
                     c_puct: float, top_k: int, max_nodes: int, edge_reward=None) -> dict:
    """``z0 (L,)``, ``root_logits (V,)`` -> dict(best_token, visits, q, confidence, nodes)."""
    v, var = value(z0[None])
    root = Node(z0, -1, 1.0, 0, float(v[0]), float(var[0]))
    seen = [root.value]
    count = [1]

    def expand(node: Node, logits: Tensor) -> None:
        top_logits, top_tok = logits.float().topk(top_k)
        p = torch.softmax(top_logits, dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j in range(top_k):
            z = dynamics(node.latent[None], top_tok[j : j + 1])[0]
            cv, cvar = value(z[None])
            ret = node.ret
            if edge_reward is not None:
                ret += float(edge_reward(logp[top_tok[j]].view(1, 1), top_tok[j].view(1, 1))[0, 0])
            child = Node(z, int(top_tok[j]), float(p[j]), node.depth + 1, ret + float(cv[0]), float(cvar[0]),
                         parent=node, ret=ret)
            node.children.append(child)
            seen.append(child.value)
        count[0] += top_k

    expand(root, root_logits)
    for _ in range(simulations):
        node = root
        while node.children and node.depth < depth:
            lo, hi = min(seen), max(seen)
            span = max(hi - lo, 1e-8)
            n_p = math.sqrt(max(node.visits, 1))
            scores = [(c.q() - lo) / span + c_puct * c.prior * n_p / (1 + c.visits) for c in node.children]
            node = node.children[scores.index(max(scores))]
        if not node.children and node.depth < depth and count[0] + top_k <= max_nodes:
            expand(node, prior(node.latent[None])[0])
        leaf_value = node.value
        while node is not None:
            node.visits += 1
            node.wsum += leaf_value
            node.wsq += leaf_value * leaf_value
            node = node.parent

    lo, hi = min(seen), max(seen)
    span = max(hi - lo, 1e-8)
    kids = root.children
    total = max(sum(c.visits for c in kids), 1)
    keys = [c.visits + 1e-3 * (c.q() - lo) / span for c in kids]
    best = kids[keys.index(max(keys))]
    pi = [c.visits / total for c in kids]
    concentration = min(max((max(pi) - 1 / top_k) / (1 - 1 / top_k), 0.0), 1.0)
    others = [(p, c) for p, c in zip(pi, kids) if c is not best]
    if sum(p for p, _ in others) > 0:
        alt = sum(p * c.q() for p, c in others) / sum(p for p, _ in others)
    else:  # no alternative was visited: their own value estimates, equally weighted
        alt = sum(c.q() for _, c in others) / len(others)
    gap = max(best.q() - alt, 0.0)
    n_b = max(best.visits, 1)
    var_backed = max(best.wsq / n_b - (best.wsum / n_b) ** 2, 0.0)
    spread = math.sqrt(var_backed + best.var)
    return {
        "best_token": best.token,
        "visits": [c.visits for c in kids],
        "q": [c.q() for c in kids],
        "confidence": min(max(concentration * gap / (gap + spread + 1e-8), 0.0), 1.0),
        "nodes": count[0],
        "root_value": root.wsum / max(root.visits, 1),
    }
