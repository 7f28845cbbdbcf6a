"""Utility measurement and one crystallization round (see :mod:`traces_crystallize.paths`).

:func:`crystallize_round` is what the ``crystallization`` regularizer runs every
``prune_interval`` training steps, on the batch the model was just trained on; it can also
be called directly (probes, benchmarks, tests). All passes run without gradient, in eval
mode (no dropout), and leave the model in the mode it was in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traces_crystallize.paths import crystallization_score


def _backbone(model: nn.Module):
    bb = getattr(model, "backbone", None)
    if bb is None or getattr(bb, "motifs", None) is None:
        raise ValueError("crystallization needs a `transformer` backbone with ffn: moe and crystallization.enabled: true")
    return bb


@torch.no_grad()
def measure(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """Per-token paths, router entropy, loss, and loss increase when each layer is re-routed.

    Returns ``paths (N, L)``, ``entropy (N, L)``, ``ce (N,)``, ``delta (N, L)`` (CE with MoE
    layer ``l`` re-routed minus CE) and ``motif (N,)`` (the motif that served the token, -1),
    over the ``N = B * (T - 1)`` positions that have a next token.
    """
    bb = _backbone(model)
    ctx = bb._ctx
    was = model.training
    model.eval()
    B, T = tokens.shape
    keep = torch.arange(B * T, device=tokens.device).view(B, T)[:, :-1].reshape(-1)  # positions with a target

    def ce() -> Tensor:
        logits = model(tokens)[0][:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="none")

    try:
        ctx.record = True
        base = ce()
        paths = torch.stack(ctx.paths, 1)[keep]  # (N, L)
        entropy = torch.stack(ctx.entropy, 1)[keep]
        motif = ctx.served[keep] if ctx.served is not None else torch.full_like(base, -1, dtype=torch.long)
        deltas = []
        for i, block in enumerate(bb.layers):
            if block.moe:
                ctx.reroute_layer = i
                deltas.append(ce() - base)
        ctx.reroute_layer = None
    finally:
        ctx.record = False
        ctx.reroute_layer = None
        ctx.paths, ctx.entropy, ctx.served = [], [], None
        model.train(was)
    return {"paths": paths, "entropy": entropy, "ce": base, "delta": torch.stack(deltas, 1), "motif": motif}


@torch.no_grad()
def crystallize_round(model: nn.Module, tokens: Tensor, step: int | None = None) -> dict[str, float]:
    """Measure utility on ``tokens (B, T)``, re-check active motifs (dissolving those whose
    utility fell below ``min_utility``), crystallize the best new candidates, prune the trie."""
    bb = _backbone(model)
    trie, motifs = bb.trie, bb.motifs
    step = bb._ctx.step if step is None else step
    m = measure(model, tokens)
    if len(trie) == 0:  # nothing logged yet (direct use): log these tokens' paths
        trie.insert(m["paths"], m["entropy"], step)
    trie.add_utility(m["paths"], m["delta"])
    motif_util = {}
    for mid in motifs.active.nonzero().flatten().tolist():
        on = m["motif"] == mid
        if on.any():
            layers = (motifs.path[mid] >= 0).nonzero().flatten()
            motif_util[mid] = float(m["delta"][on][:, layers].sum(1).mean())
    formed, dissolved, n_cands = update_motifs(bb, motif_util, step)
    pruned = trie.prune()
    return {
        "motifs": float(motifs.n_active), "formed": float(formed), "dissolved": float(dissolved),
        "candidates": float(n_cands), "trie_nodes": float(len(trie)), "trie_bytes": float(trie.nbytes()),
        "pruned": float(pruned), "ce": float(m["ce"].mean()),
    }


def ffn_flops(model: nn.Module, tokens: Tensor, motifs_on: bool = True) -> dict[str, float]:
    """Forward FLOPs of the MoE feed-forwards on ``tokens`` (2 per multiply-add), counted from
    the expert evaluations actually made, and the FLOPs of the whole forward (dense parts
    estimated as ``2 * params`` per token plus attention ``4 * T * D`` per token per layer)."""
    bb = model.backbone
    moes = bb.moe_layers()
    saved = bb.motifs.n_active if bb.motifs is not None else 0
    was = model.training
    model.eval()
    try:
        if bb.motifs is not None and not motifs_on:
            bb.motifs.n_active = 0
        for moe in moes:
            moe.counting, moe.expert_calls, moe.routed_tokens = True, 0, 0
        with torch.no_grad():
            model(tokens)
        D = bb.d_model
        expert = 0
        for moe in moes:
            hidden = moe.w1.shape[2]
            expert += moe.expert_calls * 4 * D * hidden + moe.routed_tokens * 2 * D * moe.n_experts
        B, T = tokens.shape
        dense_params = sum(p.numel() for n, p in model.named_parameters() if ".ffn." not in n and "embed" not in n)
        other = B * T * (2 * dense_params + 2 * D * model.vocab_size + bb.n_layers * 4 * T * D)  # + the head
        return {"ffn_flops": float(expert), "total_flops": float(expert + other)}
    finally:
        for moe in moes:
            moe.counting = False
        if bb.motifs is not None:
            bb.motifs.n_active = saved
        model.train(was)


def update_motifs(bb, motif_util: dict[int, float], step: int) -> tuple[int, int, int]:
    """The decisions of a round, from the trie's statistics and re-measured motif utilities:
    dissolve motifs whose utility fell below ``min_utility`` (unfreezing experts no other
    motif uses), then crystallize the best-scoring candidates within the limits.
    Returns ``(formed, dissolved, candidates)``."""
    cr = bb.params.crystallization
    trie, motifs = bb.trie, bb.motifs
    moes = bb.moe_layers()
    dissolved = 0
    for mid, util in motif_util.items():
        motifs.util[mid] = util
        node = trie.nodes.get((int(motifs.start[mid]), tuple(e for e in motifs.path[mid].tolist() if e >= 0)))
        if node is not None:  # the re-measured utility is the latest evidence on that segment
            node.util_n = max(node.util_n, 1.0)
            node.util_sum = util * node.util_n
        if util < cr.min_utility:
            motifs.remove(mid)
            dissolved += 1
    used = motifs.experts_used()
    for layer, moe in enumerate(moes):
        for e in moe.crystal.nonzero().flatten().tolist():
            if (layer, e) not in used:
                moe.set_crystal(e, False)
    w = (cr.w_frequency, cr.w_utility, cr.w_entropy, cr.w_age)
    cands = []
    for key in trie.nodes:
        start, seg = key
        if len(seg) < 2:
            continue
        st = trie.stats(key, step)
        if not (st["f"] >= cr.min_frequency and st["U"] >= cr.min_utility and st["H"] <= cr.max_entropy):
            continue  # (a NaN utility, never measured, fails the comparison)
        score = crystallization_score(st["f"], st["U"], st["H"], st["age"], w)
        if score >= cr.threshold:
            cands.append((score, key, st))
    cands.sort(key=lambda c: -c[0])
    formed = 0
    for score, (start, seg), st in cands:
        if motifs.n_active >= cr.max_motifs:
            break
        if motifs.add(start, seg, st, score) is not None:
            formed += 1
            for j, e in enumerate(seg):
                moes[start + j].set_crystal(e, True)
    return formed, dissolved, len(cands)
