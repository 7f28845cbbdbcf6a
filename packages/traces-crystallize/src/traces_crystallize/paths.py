"""Routing paths, the path trie, and crystallization of frequent useful paths into motifs.

A token's *path* is its first-choice expert at every MoE layer, ``(e_0, ..., e_{L-1})``.
The trie counts every *segment* ``(s, (e_s, ..., e_{s+m-1}))`` with ``1 <= m <= max_len``
(a suffix-trie of the paths truncated to ``max_len``: a node's parent is the segment
without its last expert). Per node it keeps

* ``f``  frequency: tokens seen on that segment (over the logged training steps);
* ``U``  utility: mean over the tokens on the segment of ``sum_{l in segment} (CE_l - CE)``
  where ``CE`` is the token's next-token cross-entropy and ``CE_l`` the same when only
  layer ``l`` is re-routed to its next-best experts (one no-grad pass per layer). ``U > 0``
  means the segment's routing helps. Measured every ``prune_interval`` steps;
* ``H``  entropy: mean router entropy (nats) of the tokens on the segment, over its layers;
* ``age``: training steps since the node was first seen.

Memory is bounded: at every evaluation (and whenever the trie exceeds ``max_nodes``) it
keeps the ``max_nodes`` most frequent nodes (a child never outnumbers its parent, so the
kept set stays a trie). :meth:`PathTrie.nbytes` reports its size.

Crystallization: a segment with ``m >= 2`` and ``f >= min_frequency``, ``U >= min_utility``,
``H <= max_entropy`` and ``score = w1 log f + w2 U - w3 H + w4 age / 1000 >= threshold``
becomes a *motif*: its experts are frozen, and a token whose first choice at layer ``s``
is ``e_s`` is served by ``e_{s+1}, ..., e_{s+m-1}`` alone at the following layers, without
routing to ``top_k`` experts (the FLOP saving). At most one motif per trigger ``(s, e_s)``
and ``max_motifs`` in all, best scores first. A motif whose re-measured utility falls
below ``min_utility`` is dissolved and its experts are unfrozen.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(slots=True)
class NodeStats:
    count: float = 0.0
    util_sum: float = 0.0
    util_n: float = 0.0
    ent_sum: float = 0.0
    first_step: int = 0


class PathTrie:
    """Counts, utility, entropy and age of routing-path segments (keys ``(start, experts)``)."""

    def __init__(self, n_layers: int, max_len: int = 4, max_nodes: int = 20_000) -> None:
        self.n_layers, self.max_len, self.max_nodes = n_layers, max_len, max_nodes
        self.nodes: dict[tuple[int, tuple[int, ...]], NodeStats] = {}
        self.tokens_logged = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def segments(self, paths: Tensor):
        """Yield ``(start, length, unique segments (U, m), inverse (N,))`` for ``paths (N, L)``."""
        L = paths.shape[1]
        for s in range(L):
            for m in range(1, min(self.max_len, L - s) + 1):
                uniq, inv = torch.unique(paths[:, s : s + m], dim=0, return_inverse=True)
                yield s, m, uniq, inv

    def insert(self, paths: Tensor, entropy: Tensor, step: int) -> None:
        """Log tokens' ``paths (N, L)`` (long) with their router ``entropy (N, L)`` (nats)."""
        paths, entropy = paths.cpu(), entropy.float().cpu()
        self.tokens_logged += paths.shape[0]
        csum = torch.cat([torch.zeros(entropy.shape[0], 1), entropy.cumsum(1)], 1)  # (N, L+1)
        for s, m, uniq, inv in self.segments(paths):
            seg_ent = (csum[:, s + m] - csum[:, s]) / m  # (N,)
            cnt = torch.bincount(inv, minlength=len(uniq)).tolist()
            ent = torch.zeros(len(uniq)).index_add_(0, inv, seg_ent).tolist()
            for row, c, e in zip(uniq.tolist(), cnt, ent):
                node = self.nodes.get((s, tuple(row)))
                if node is None:
                    node = self.nodes[(s, tuple(row))] = NodeStats(first_step=step)
                node.count += c
                node.ent_sum += e
        if len(self.nodes) > self.max_nodes:
            self.prune()

    def add_utility(self, paths: Tensor, delta: Tensor) -> None:
        """Record utility samples: ``delta (N, L)`` = CE with layer l re-routed minus CE."""
        paths, delta = paths.cpu(), delta.float().cpu()
        csum = torch.cat([torch.zeros(delta.shape[0], 1), delta.cumsum(1)], 1)  # (N, L+1)
        for s, m, uniq, inv in self.segments(paths):
            seg = csum[:, s + m] - csum[:, s]  # (N,)
            tot = torch.zeros(len(uniq)).index_add_(0, inv, seg).tolist()
            cnt = torch.bincount(inv, minlength=len(uniq)).tolist()
            for row, t, c in zip(uniq.tolist(), tot, cnt):
                node = self.nodes.get((s, tuple(row)))
                if node is not None:
                    node.util_sum += t
                    node.util_n += c

    def stats(self, key: tuple[int, tuple[int, ...]], step: int) -> dict[str, float]:
        n = self.nodes[key]
        return {
            "f": n.count,
            "U": n.util_sum / n.util_n if n.util_n else float("nan"),
            "H": n.ent_sum / max(n.count, 1.0),
            "age": float(step - n.first_step),
        }

    def prune(self) -> int:
        """Keep the ``max_nodes`` most frequent nodes; returns how many were removed."""
        if len(self.nodes) <= self.max_nodes:
            return 0
        keep = sorted(self.nodes.items(), key=lambda kv: (-kv[1].count, len(kv[0][1])))[: self.max_nodes]
        removed = len(self.nodes) - len(keep)
        self.nodes = dict(keep)
        return removed

    def state_dict(self) -> dict[str, Tensor | int]:
        """The nodes as tensors (``starts (K,)``, ``segments (K, max_len)`` padded with -1,
        ``stats (K, 4)`` float64: count, utility sum and samples, entropy sum; ``first_step (K,)``),
        plus ``tokens_logged``: what a checkpoint keeps (safetensors, no pickle)."""
        keys = list(self.nodes)
        segs = torch.full((len(keys), self.max_len), -1, dtype=torch.long)
        for i, (_, seg) in enumerate(keys):
            segs[i, : len(seg)] = torch.tensor(seg, dtype=torch.long)
        st = [self.nodes[k] for k in keys]
        return {
            "starts": torch.tensor([s for s, _ in keys], dtype=torch.long),
            "segments": segs,
            "stats": torch.tensor([[n.count, n.util_sum, n.util_n, n.ent_sum] for n in st],
                                  dtype=torch.float64).reshape(len(keys), 4),
            "first_step": torch.tensor([n.first_step for n in st], dtype=torch.long),
            "tokens_logged": int(self.tokens_logged),
        }

    def load_state_dict(self, state: dict) -> None:
        self.nodes = {}
        for s, seg, (c, us, un, es), first in zip(state["starts"].tolist(), state["segments"].tolist(),
                                                  state["stats"].tolist(), state["first_step"].tolist()):
            key = (s, tuple(e for e in seg if e >= 0))
            self.nodes[key] = NodeStats(count=c, util_sum=us, util_n=un, ent_sum=es, first_step=first)
        self.tokens_logged = int(state["tokens_logged"])

    def nbytes(self) -> int:
        """Python memory held by the trie's nodes (keys, tuples, stats objects)."""
        total = sys.getsizeof(self.nodes)
        for (s, seg), st in self.nodes.items():
            total += sys.getsizeof((s, seg)) + sys.getsizeof(seg) + sys.getsizeof(st)
            total += sum(sys.getsizeof(getattr(st, f)) for f in st.__slots__)
        return total


def crystallization_score(f: float, U: float, H: float, age: float, w: tuple[float, float, float, float]) -> float:
    """``w1 log f + w2 U - w3 H + w4 age / 1000`` (age in training steps)."""
    return w[0] * math.log(max(f, 1.0)) + w[1] * U - w[2] * H + w[3] * age / 1000.0


class MotifTable(nn.Module):
    """The crystallized motifs of one backbone (buffers, saved with the model).

    ``path[m, l]`` is the expert motif ``m`` uses at MoE layer ``l`` (-1 outside the motif),
    ``start[m]`` its trigger layer, ``active[m]``; ``freq``, ``util``, ``ent``, ``score`` the
    statistics at crystallization (``util`` re-measured). ``trigger[l, e]`` is the motif
    whose trigger is expert ``e`` at layer ``l`` (-1: none).
    """

    def __init__(self, n_layers: int, n_experts: int, max_motifs: int) -> None:
        super().__init__()
        self.n_layers, self.n_experts, self.max_motifs = n_layers, n_experts, max_motifs
        self.register_buffer("path", torch.full((max_motifs, n_layers), -1, dtype=torch.long))
        self.register_buffer("start", torch.zeros(max_motifs, dtype=torch.long))
        self.register_buffer("active", torch.zeros(max_motifs, dtype=torch.bool))
        for name in ("freq", "util", "ent", "score"):
            self.register_buffer(name, torch.zeros(max_motifs))
        self.register_buffer("trigger", torch.full((n_layers, n_experts), -1, dtype=torch.long))
        self.n_active = 0
        self.register_load_state_dict_post_hook(lambda module, _: module.sync())

    def sync(self) -> None:
        self.n_active = int(self.active.sum())

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def rebuild_trigger(self) -> None:
        self.trigger.fill_(-1)
        for m in self.active.nonzero().flatten().tolist():
            s = int(self.start[m])
            self.trigger[s, self.path[m, s]] = m
        self.sync()

    def listing(self) -> list[dict]:
        rows = []
        for m in self.active.nonzero().flatten().tolist():
            seg = [int(e) for e in self.path[m].tolist() if e >= 0]
            rows.append({"id": m, "start": int(self.start[m]), "experts": seg, "frequency": float(self.freq[m]),
                         "utility": float(self.util[m]), "entropy": float(self.ent[m]), "score": float(self.score[m])})
        return rows

    def experts_used(self) -> set[tuple[int, int]]:
        """(layer, expert) pairs on active motifs."""
        out = set()
        for m in self.active.nonzero().flatten().tolist():
            for layer, e in enumerate(self.path[m].tolist()):
                if e >= 0:
                    out.add((layer, e))
        return out

    def add(self, start: int, experts: tuple[int, ...], stats: dict[str, float], score: float) -> int | None:
        free = (~self.active).nonzero().flatten()
        if free.numel() == 0 or int(self.trigger[start, experts[0]]) >= 0:
            return None
        m = int(free[0])
        self.path[m].fill_(-1)
        self.path[m, start : start + len(experts)] = torch.tensor(experts, device=self.path.device)
        self.start[m] = start
        self.active[m] = True
        self.freq[m], self.util[m], self.ent[m], self.score[m] = stats["f"], stats["U"], stats["H"], score
        self.rebuild_trigger()
        return m

    def remove(self, m: int) -> None:
        self.active[m] = False
        self.path[m].fill_(-1)
        self.rebuild_trigger()

    # -- serving (called by the MoE layers during forward) -------------------------------
    def serving(self, match: Tensor | None, layer: int) -> Tensor | None:
        """Expert serving each token at ``layer`` (N,), -1 where the token is routed."""
        if match is None:
            return None
        e = self.path[match.clamp(min=0), layer]  # (N,)
        return torch.where(match >= 0, e, torch.full_like(e, -1))

    def triggered(self, match: Tensor | None, serve: Tensor | None, layer: int, top1: Tensor) -> Tensor:
        """New per-token motif ids after routing at ``layer``: routed tokens whose first choice
        triggers a motif start one; tokens being served keep theirs."""
        t = self.trigger[layer, top1]  # (N,)
        routed = torch.ones_like(top1, dtype=torch.bool) if serve is None else serve < 0
        old = torch.full_like(top1, -1) if match is None else match
        return torch.where(routed & (t >= 0), t, torch.where(routed, torch.full_like(old, -1), old))
