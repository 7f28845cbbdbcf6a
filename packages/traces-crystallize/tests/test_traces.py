import copy
import math
from types import SimpleNamespace

import torch

from traces_crystallize import reference
from traces_crystallize.plugin import TransformerParams
from traces_crystallize.traces import TraceStore
from traces_crystallize.transformer import TransformerBackbone, apply_rotary

D = 16


def store_from(entries, quota):
    t = TraceStore(len(entries), quota)
    for h, mem in enumerate(entries):
        for q, (d, m) in enumerate(mem.items()):
            t.off[h, q], t.val[h, q] = d, m
    t.sync()
    return t


def test_sparse_bias_equals_dense_reference_attention():
    """The layer's biased attention (sparse M -> float mask) equals explicit softmax with a dense bias,
    for a whole sequence and for a chunk that continues a KV cache, in one SDPA call or split into
    query blocks (``bias_chunks``, even and uneven, more blocks than rows)."""
    p = TransformerParams(n_layers=1, n_heads=2, max_seq_len=32,
                          traces={"enabled": True, "quota_per_head": 5, "warmup_steps": 0, "alpha_warmup_steps": 0})
    bb = TransformerBackbone(p, D).eval()
    attn = bb.layers[0].attn
    entries = [{0: 0.9, 2: 0.4, 5: 1.3}, {1: 2.0, 3: 0.7, 11: 0.5, 4: 0.2}]
    for h, mem in enumerate(entries):
        for q, (d, m) in enumerate(mem.items()):
            attn.traces.off[h, q], attn.traces.val[h, q] = d, m
    attn.traces.sync()
    with torch.no_grad():
        attn.traces.alpha.copy_(torch.tensor([0.8, 1.5]))
    dense = torch.zeros(2, 16)
    for h, mem in enumerate(entries):
        for d, m in mem.items():
            dense[h, d] = m
    torch.testing.assert_close(attn.traces.dense(16), dense)
    bias = torch.tensor([0.8, 1.5])[:, None] * dense
    x = torch.randn(2, 12, D)
    with torch.no_grad():
        for past, T, chunks in [(0, 12, 1), (5, 7, 1), (0, 12, 4), (0, 12, 5), (5, 7, 4), (5, 7, 9)]:
            attn.bias_chunks = chunks
            q, k, v = attn.c_attn(x).split(D, 2)
            q, k, v = (t.view(2, 12, 2, 8).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
            cos, sin = attn._rope(0, 12)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            ref = reference.attention(q[:, :, past:], k, v, past=past, bias_by_offset=bias)
            expected = attn.c_proj(ref.transpose(1, 2).reshape(2, T, D))
            state = None
            if past:
                _, kk, vv, _ = attn(x[:, :past], None, None, False)
                state = {"k": kk, "v": vv}
            out, _, _, _ = attn(x[:, past:], state, None, False)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4, msg=f"past {past}, {chunks} chunks")
        # and it differs from the unbiased output, so the bias is really applied
        biased, _, _, _ = attn(x, None, None, False)
        attn.traces.off.fill_(-1)
        attn.traces.sync()
        plain, _, _, _ = attn(x, None, None, False)
    assert (plain - biased).abs().max() > 1e-3


def test_update_rule_matches_reference_over_several_captures():
    g = torch.Generator().manual_seed(0)
    H, L, quota = 3, 20, 6
    kw = dict(threshold=0.3, retention=0.9, decay=0.8)
    t = TraceStore(H, quota, **kw)
    ref = [{} for _ in range(H)]
    for _ in range(6):
        S = torch.rand(H, L, generator=g) ** 2
        t.update(S)
        ref = reference.update_traces(ref, S, quota=quota, **kw)
        got = [{int(d): float(m) for d, m in zip(t.off[h], t.val[h]) if d >= 0} for h in range(H)]
        for h in range(H):
            assert set(got[h]) == set(ref[h])
            for d in ref[h]:
                assert math.isclose(got[h][d], ref[h][d], rel_tol=1e-5)


def test_first_capture_values_follow_the_rule():
    t = TraceStore(1, 8, threshold=0.05, retention=0.95, decay=0.98)
    t.update(torch.tensor([[0.5, 0.01, 0.2]]))  # offsets 0 and 2 salient, 1 below theta
    torch.testing.assert_close(t.dense(3), torch.tensor([[0.05 * 0.5, 0.0, 0.05 * 0.2]]))
    t.update(torch.tensor([[0.0, 0.0, 0.2]]))  # offset 0 decays, offset 2 reinforced
    torch.testing.assert_close(t.dense(3), torch.tensor([[0.98 * 0.025, 0.0, 0.95 * 0.01 + 0.05 * 0.2]]))


def test_quota_is_enforced_and_smallest_are_evicted():
    t = TraceStore(2, 4, threshold=0.0, retention=0.0)  # M <- S for every salient link
    S = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]])
    t.update(S)
    assert ((t.off >= 0).sum(1) == 4).all()
    assert sorted(t.off[0].tolist()) == [1, 3, 5, 6]
    assert sorted(t.off[1].tolist()) == [0, 1, 2, 3]
    assert t.nbytes() == 2 * 4 * (4 + 4)


def test_footprint_32_layers_8_heads_default_quota_under_30mb():
    t = TraceStore(8, TransformerParams().traces.quota_per_head)
    assert 32 * t.nbytes() == 32 * 8 * 2048 * 8 <= 30e6


def test_cheap_salience_ranks_offsets_like_the_exact_gradient():
    """Planted case: each head attends strongly at a few offsets (copy-like heads); the
    forward-only estimator A*|v| and the exact A*|dL/dA| rank the top offsets the same."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 16, 2, 24, 8
    planted = [(1, 4, 9), (2, 6, 13)]  # offsets per head, strongest first
    strength = [5.0, 4.5, 4.0]
    q = torch.zeros(B, H, T, hd)
    k = torch.zeros(B, H, T, hd)
    v = torch.randn(B, H, T, hd, generator=g)
    logits_bias = torch.zeros(H, T, T)
    for h, offs in enumerate(planted):
        for d, s in zip(offs, strength):
            idx = torch.arange(d, T)
            logits_bias[h, idx, idx - d] = s
    # realise the bias through q.k: one-hot position codes scaled into q and k
    q = torch.randn(B, H, T, hd, generator=g) * 0.1
    k = torch.randn(B, H, T, hd, generator=g) * 0.1
    target = torch.randn(B, H, T, hd, generator=g)

    def attn_with(qq, kk):
        off = reference.offsets_matrix(T, T, 0)
        logits = qq @ kk.transpose(-2, -1) / math.sqrt(hd) + logits_bias
        return logits.masked_fill(off < 0, float("-inf")).softmax(-1)

    A = attn_with(q, k)
    from traces_crystallize.traces import aggregate_by_offset

    cheap = aggregate_by_offset(A * v.norm(dim=-1)[:, :, None, :], reference.offsets_matrix(T, T, 0), T)
    # exact: same attention, true gradient of an MSE loss on the output
    A_ = A.clone().requires_grad_(True)
    loss = ((A_ @ v) - target).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, A_)
    exact = aggregate_by_offset(A * grad.abs(), reference.offsets_matrix(T, T, 0), T)
    for h in range(H):
        top_cheap = cheap[h].topk(4).indices.tolist()
        top_exact = exact[h].topk(4).indices.tolist()
        assert top_cheap == top_exact, (h, top_cheap, top_exact)
        assert top_cheap[:3] == list(planted[h])  # then offset 0: the first queries see only themselves


def test_capture_runs_on_schedule_and_never_from_a_forward():
    p = TransformerParams(n_layers=2, n_heads=2, max_seq_len=32,
                          traces={"enabled": True, "warmup_steps": 3, "update_interval": 2, "threshold": 0.0})
    bb = TransformerBackbone(p, D)
    x = torch.randn(2, 10, D)
    for mode in (bb.eval, bb.train):  # forwards alone update nothing, in either mode
        mode()
        for _ in range(5):
            bb(x)
    assert int(bb.train_step) == 0 and bb.layers[0].attn.traces.n_live == 0
    captured = []
    for step in range(1, 8):
        before = bb.layers[0].attn.traces.val.clone()
        bb.begin_step(step, x)
        bb(x)
        captured.append(not torch.equal(before, bb.layers[0].attn.traces.val))
    assert captured == [False, False, True, False, True, False, True]  # steps 3, 5, 7
    assert int(bb.train_step) == 7
    assert bb.layers[1].attn.traces.n_live > 0


def test_capture_pass_reads_only_capture_rows():
    """The forward-only capture pass sees the first ``capture_rows`` rows: changing another row
    leaves the captured memory unchanged; changing a captured row does not."""
    tr = {"enabled": True, "warmup_steps": 0, "update_interval": 1, "threshold": 0.0, "capture_rows": 1}
    p = TransformerParams(n_layers=2, n_heads=2, max_seq_len=32, traces=tr)
    torch.manual_seed(0)
    x = torch.randn(3, 10, D)
    mems = []
    for change in (None, 2, 0):
        torch.manual_seed(1)
        bb = TransformerBackbone(p, D).train()
        xi = x.clone()
        if change is not None:
            xi[change] = torch.randn(10, D)
        bb.begin_step(1, xi)
        mems.append(torch.cat([b.attn.traces.val for b in bb.layers]))
    assert mems[0].abs().sum() > 0
    torch.testing.assert_close(mems[1], mems[0])
    assert not torch.allclose(mems[2], mems[0])


def test_traces_only_training_forward_is_one_graph_and_the_callback_captures():
    """With crystallization off, the training forward has no graph break (a break inside the
    core's layer loop would split every layer into its own compiled frame): the step counter
    and the capture run in the backbone's callback, before the forward."""
    import statelab
    from statelab.callbacks import MicroBatch, component_callbacks

    spec = {"name": "t", "tokenizer": {"kind": "byte"},
            "model": {"d_model": D, "backbone": {"kind": "transformer", "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
                                                  "traces": {"enabled": True, "warmup_steps": 1, "update_interval": 1,
                                                             "threshold": 0.0}}},
            "tracking": {"enabled": False}}
    model = statelab.build(spec).train()
    x = torch.randint(0, 256, (2, 12))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert int(model.backbone.train_step) == 0 and model.backbone.layers[0].attn.traces.n_live == 0
    twin = copy.deepcopy(model)  # a copy's callback drives the copy
    (name, cb), = component_callbacks(twin).items()
    assert name == "backbone:schedule"
    cb.on_micro_batch_start(SimpleNamespace(step=0, model=twin), MicroBatch(0, x, x, None))
    assert int(twin.backbone.train_step) == 1 and twin.backbone.layers[0].attn.traces.n_live > 0
    assert int(model.backbone.train_step) == 0 and model.backbone.layers[0].attn.traces.n_live == 0


def test_diagonal_sums_match_the_scatter_by_offset():
    """The atomics-free relative shift used for whole sequences equals the scatter over the
    offsets matrix (which the KV-cache case still uses), and a brute-force sum."""
    from traces_crystallize.traces import aggregate_by_offset, diagonal_sums

    g = torch.Generator().manual_seed(0)
    T = 9
    s = torch.rand(2, 3, T, T, generator=g)
    off = reference.offsets_matrix(T, T, 0)
    brute = torch.stack([sum(s[..., i, i - d] for i in range(d, T)) for d in range(T)], -1)  # (2, 3, T)
    torch.testing.assert_close(diagonal_sums(s * (off >= 0)), brute)
    # the full aggregate: diagonal path (T == Tk, no cache) against the scatter path it replaced
    fast = aggregate_by_offset(s, off, T, shift=True)
    torch.testing.assert_close(fast, aggregate_by_offset(s, off, T, shift=False))
