import math
from types import SimpleNamespace

import torch

import statelab
from statelab.callbacks import CallbackList, MicroBatch, component_callbacks
from traces_crystallize import reference
from traces_crystallize.crystallize import crystallize_round, ffn_flops, update_motifs
from traces_crystallize.paths import NodeStats, PathTrie, crystallization_score
from traces_crystallize.plugin import TransformerParams
from traces_crystallize.transformer import TransformerBackbone

D = 16


def test_trie_counts_match_brute_force_and_entropy_is_averaged():
    g = torch.Generator().manual_seed(0)
    paths = torch.randint(0, 3, (200, 4), generator=g)
    ent = torch.rand(200, 4, generator=g)
    trie = PathTrie(4, max_len=3)
    trie.insert(paths[:120], ent[:120], step=5)
    trie.insert(paths[120:], ent[120:], step=9)
    ref = reference.path_counts(paths, 3)
    assert {k: int(v.count) for k, v in trie.nodes.items()} == dict(ref)
    assert trie.tokens_logged == 200
    key = (1, tuple(paths[0, 1:3].tolist()))
    rows = [i for i in range(200) if tuple(paths[i, 1:3].tolist()) == key[1]]
    st = trie.stats(key, step=10)
    assert st["f"] == len(rows)
    assert math.isclose(st["H"], float(ent[rows, 1:3].mean()), rel_tol=1e-5)
    assert st["age"] == 5.0  # first seen in the insert at step 5
    assert math.isnan(st["U"])
    delta = torch.rand(200, 4, generator=g)
    trie.add_utility(paths, delta)
    assert math.isclose(trie.stats(key, 10)["U"], float(delta[rows, 1:3].sum(1).mean()), rel_tol=1e-5)


def test_trie_memory_is_bounded_by_pruning():
    g = torch.Generator().manual_seed(1)
    trie = PathTrie(6, max_len=4, max_nodes=300)
    for step in range(5):
        trie.insert(torch.randint(0, 8, (500, 6), generator=g), torch.rand(500, 6, generator=g), step)
        assert len(trie) <= 300
    # the kept nodes are the most frequent ones and stay a trie (every parent is kept)
    for s, seg in trie.nodes:
        if len(seg) > 1:
            assert (s, seg[:-1]) in trie.nodes
    small = trie.nbytes()
    assert 0 < small < 300 * 1000


def crystal_backbone(**cr):
    base = dict(enabled=True, min_frequency=10, min_utility=0.05, max_entropy=1.0, threshold=0.0, max_motifs=3,
                max_motif_len=3, log_interval=1)
    base.update(cr)
    p = TransformerParams(n_layers=3, n_heads=2, max_seq_len=32, ffn="moe", n_experts=4, top_k=2, crystallization=base)
    return TransformerBackbone(p, D)


def put(trie, key, f, U, H, first=0):
    trie.nodes[key] = NodeStats(count=f, util_sum=U * f, util_n=f, ent_sum=H * f, first_step=first)


def test_crystallization_limits_and_unfreezing():
    bb = crystal_backbone()
    t = bb.trie
    put(t, (0, (1, 2)), f=50, U=0.4, H=0.3)        # best: forms
    put(t, (0, (1, 3)), f=40, U=0.3, H=0.2)        # same trigger (layer 0, expert 1): blocked
    put(t, (1, (0, 3)), f=5, U=0.9, H=0.1)         # below min_frequency
    put(t, (1, (2, 2)), f=30, U=0.01, H=0.1)       # below min_utility
    put(t, (1, (3, 1)), f=30, U=0.2, H=1.5)        # too much entropy
    put(t, (0, (2,)), f=99, U=1.0, H=0.0)          # length 1: never a motif
    put(t, (1, (1, 0)), f=20, U=0.2, H=0.5)        # forms
    formed, dissolved, cands = update_motifs(bb, {}, step=100)
    assert (formed, dissolved, cands) == (2, 0, 3)
    rows = {(r["start"], tuple(r["experts"])) for r in bb.motifs.listing()}
    assert rows == {(0, (1, 2)), (1, (1, 0))}
    moes = bb.moe_layers()
    assert moes[0].crystal.tolist() == [False, True, False, False]
    assert moes[1].crystal.tolist() == [False, True, True, False]  # expert 2 (first motif), expert 1 (second's trigger)
    assert moes[2].crystal.tolist() == [True, False, False, False]
    assert moes[1].n_frozen == 2
    # the score ranks them
    top = max(bb.motifs.listing(), key=lambda r: r["score"])
    assert top["experts"] == [1, 2]
    assert math.isclose(top["score"], crystallization_score(50, 0.4, 0.3, 100, (1.0, 10.0, 1.0, 0.1)), rel_tol=1e-5)
    # a motif whose utility drops is dissolved and its experts unfrozen
    mid = top["id"]
    formed, dissolved, _ = update_motifs(bb, {mid: 0.01}, step=200)
    assert dissolved == 1
    # (the blocked candidate (0, (1, 3)) now takes the free trigger)
    assert {(r["start"], tuple(r["experts"])) for r in bb.motifs.listing()} == {(0, (1, 3)), (1, (1, 0))}
    assert moes[1].crystal.tolist() == [False, True, False, True]
    assert 2 not in moes[1]._anchors


def test_max_motifs_limit():
    bb = crystal_backbone(max_motifs=2)
    for e in range(4):
        put(bb.trie, (0, (e, 0)), f=20 + e, U=0.5, H=0.1)
    formed, _, cands = update_motifs(bb, {}, step=0)
    assert (formed, cands, bb.motifs.n_active) == (2, 4, 2)
    assert sorted(r["experts"][0] for r in bb.motifs.listing()) == [2, 3]  # the most frequent


def test_frozen_experts_do_not_move_under_training():
    bb = crystal_backbone()
    moe = bb.moe_layers()[1]
    moe.set_crystal(2, True)
    before = moe.w1.detach().clone()
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-2, weight_decay=0.1)
    bb.train()
    for _ in range(3):
        y, _, _ = bb(torch.randn(2, 8, D))
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    bb(torch.randn(1, 2, D))  # the next training forward restores exactly
    assert torch.equal(moe.w1[2], before[2])
    assert not torch.equal(moe.w1[0], before[0])
    moe.set_crystal(2, False)
    assert moe.n_frozen == 0


def _copy_model(cr):
    spec = {"name": "c", "tokenizer": {"kind": "byte"},
            "model": {"d_model": D, "vocab_size": 12,
                      "backbone": {"kind": "transformer", "n_layers": 3, "n_heads": 2, "ffn": "moe", "n_experts": 4,
                                   "top_k": 2, "max_seq_len": 32, "crystallization": cr},
                      "regularizers": [{"kind": "crystallization", "weight": 0.01}, {"kind": "load-balance", "weight": 0.01},
                                       {"kind": "ewc", "weight": 1.0}]},
            "tracking": {"enabled": False}}
    return statelab.build(spec)


def test_motifs_form_in_training_and_save_flops():
    """A tiny MoE trained on a periodic sequence: the crystallization regularizer logs paths,
    measures utility every prune_interval steps and crystallizes; served tokens skip experts."""
    torch.manual_seed(0)
    cr = {"enabled": True, "log_interval": 1, "prune_interval": 40, "min_frequency": 20, "min_utility": -1.0,
          "max_entropy": 2.0, "threshold": -100.0, "max_motifs": 4, "freeze": True}
    model = _copy_model(cr)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    base = torch.tensor([1, 5, 2, 7, 3, 9, 4, 11])
    model.train()
    hooks = CallbackList(component_callbacks(model))  # what the trainer calls around a loop like this one
    loop = SimpleNamespace(model=model, step=0)
    for step in range(40):
        x = torch.stack([base.roll(int(r)) for r in torch.randint(0, 8, (8,))]).repeat(1, 3)  # (8, 24)
        mb = MicroBatch(0, x, x, None)
        hooks.call("on_micro_batch_start", loop, mb)
        logits, _, aux = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        reg, metrics = model.regularization(aux)
        (loss + reg).backward()
        hooks.call("on_micro_batch_end", loop, mb)
        opt.step()
        loop.step += 1
        hooks.call("on_optimizer_step", loop, loop.step)
        opt.zero_grad()
    bb = model.backbone
    assert int(bb.train_step) == 40 and len(bb.trie) > 0
    assert bb.motifs.n_active > 0, model.regularizers[0].last_round
    # the round ran after the 40th optimizer step, so the step's own forward still saw none
    assert model.regularizers[0].last_round["motifs"] == bb.motifs.n_active
    assert metrics["reg/0.crystallization.motifs"] == 0 and metrics["reg/0.crystallization.trie_nodes"] > 0
    x = torch.stack([base.roll(i) for i in range(8)]).repeat(1, 3)
    on, off = ffn_flops(model, x, True), ffn_flops(model, x, False)
    assert on["ffn_flops"] < off["ffn_flops"]
    # EWC: zero at the anchor (a training forward restores the frozen experts exactly),
    # positive once a protected expert moves
    with torch.no_grad():
        model(x)
    ewc = model.regularizers[2]
    loss0, m0 = ewc({}, model)
    assert m0["protected"] > 0 and float(loss0.detach()) == 0.0
    layer, e = next(iter(bb.motifs.experts_used()))
    with torch.no_grad():
        bb.moe_layers()[layer].w1[e] += 0.1
    assert float(ewc({}, model)[0].detach()) > 0


def test_crystallize_round_directly_and_unfreeze_when_utility_is_low():
    torch.manual_seed(0)
    cr = {"enabled": True, "min_frequency": 1, "min_utility": -10.0, "max_entropy": 5.0, "threshold": -100.0,
          "max_motifs": 2}
    model = _copy_model(cr)
    x = torch.randint(0, 12, (4, 16))
    out = crystallize_round(model, x, step=1)
    assert out["motifs"] == 2 and out["formed"] == 2
    bb = model.backbone
    assert sum(m.n_frozen for m in bb.moe_layers()) > 0
    bb.params.crystallization.min_utility = 10.0  # now nothing is useful enough
    out = crystallize_round(model, x, step=2)
    assert out["dissolved"] >= 1
    assert bb.motifs.n_active == 0 or all(r["utility"] >= 10.0 for r in bb.motifs.listing())
