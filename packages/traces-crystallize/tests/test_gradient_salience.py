"""Salience with the true gradient, ``A * |dL/dA| * log(1 + recurrence)`` (issue #24)."""

import torch

from traces_crystallize import reference
from traces_crystallize.plugin import TransformerParams
from traces_crystallize.traces import aggregate_by_offset, gradient_salience
from traces_crystallize.transformer import TransformerBackbone

D = 16


def planted(seed: int, d_star: int, B: int = 8, H: int = 2, T: int = 16, hd: int = 32):
    """Uniform causal attention over values of equal norm; the loss reads only the key at
    offset ``d_star`` (``L = sum_i <y_i, v_{i - d_star}>``), so ``|dL/dA_ij| = |<v_{i-d*}, v_j>|``
    is ``|v|^2`` on the planted key and a random inner product elsewhere. Attention and ``|v|``
    alone favour no offset but 0 (which the early queries weigh most)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(B, H, T, hd, generator=g), dim=-1) * 3.0  # (B, H, T, hd)
    off = reference.offsets_matrix(T, T, 0)
    A = torch.zeros(B, H, T, T).masked_fill(off < 0, float("-inf")).softmax(-1).requires_grad_(True)
    y = A @ v  # (B, H, T, hd)
    loss = (y[:, :, d_star:] * v[:, :, : T - d_star]).sum()
    (grad,) = torch.autograd.grad(loss, A)
    return A.detach(), grad, v, off, g


def test_planted_key_with_large_gradient_ranks_first_and_noise_does_not():
    for seed, d_star in [(0, 3), (1, 5), (2, 7)]:
        A, grad, v, off, g = planted(seed, d_star)
        T = A.shape[-1]
        S = gradient_salience(A, grad, past=0)  # (H, T)
        assert S.argmax(1).tolist() == [d_star, d_star], (seed, S)
        assert 0 <= float(S.min()) and float(S.max()) <= 1
        # the same aggregate with |dL/dA| replaced by noise of the same scale, or by |v_j| (the cheap estimator), misses it
        noise = torch.randn(grad.shape, generator=g) * grad.abs().mean()
        S_noise = aggregate_by_offset(A * noise.abs(), off, T, past=0, log_recurrence=True)
        S_value = aggregate_by_offset(A * v.norm(dim=-1)[:, :, None, :], off, T, past=0, log_recurrence=True)
        assert d_star not in S_noise.argmax(1).tolist(), (seed, S_noise)
        assert d_star not in S_value.argmax(1).tolist(), (seed, S_value)


def test_log_recurrence_weighs_by_log1p_of_the_count():
    """``log_recurrence``: the fraction n / B of sequences above their mean becomes log(1 + n) / log(1 + B)."""
    A, grad, _, off, _ = planted(0, 3, B=4)
    s = A * grad.abs()
    frac = aggregate_by_offset(s, off, 16, past=0)
    logw = aggregate_by_offset(s, off, 16, past=0, log_recurrence=True)
    both = frac > 0
    assert torch.equal(both, logw > 0)
    ratio = logw[both] / frac[both]  # (log1p(n) / log1p(B)) / (n / B) for the entry's count n in 1..B
    counts = torch.arange(1, 5, dtype=torch.float32)
    allowed = (counts.log1p() / torch.tensor(5.0).log()) / (counts / 4)
    assert all(torch.isclose(r, allowed, rtol=1e-5).any() for r in ratio)


def backbone(**traces):
    tr = {"enabled": True, "warmup_steps": 0, "update_interval": 1, "threshold": 0.0, "capture_rows": 2,
          "alpha_warmup_steps": 0, **traces}
    torch.manual_seed(0)
    return TransformerBackbone(TransformerParams(n_layers=2, n_heads=2, max_seq_len=32, traces=tr), D).train()


def test_capture_with_a_loss_follows_the_gradient_and_leaves_parameter_grads_alone():
    torch.manual_seed(1)
    x = torch.randn(3, 12, D)
    bb = backbone()
    bb.capture_traces(x, loss_fn=lambda h: h.pow(2).sum())
    assert all(p.grad is None for p in bb.parameters())
    assert all(b.attn.traces.n_live > 0 for b in bb.layers)
    grad_mem = torch.cat([b.attn.traces.dense(12) for b in bb.layers])
    # a loss that does not depend on the attention gives zero salience: nothing is traced
    bb0 = backbone()
    bb0.capture_traces(x, loss_fn=lambda h: (h * 0).sum() + x.sum())
    assert all(b.attn.traces.n_live == 0 for b in bb0.layers)
    # the forward-only capture (A * |v|) traces something else
    bbv = backbone()
    bbv.capture_traces(x)
    assert not torch.allclose(torch.cat([b.attn.traces.dense(12) for b in bbv.layers]), grad_mem)
    assert all(b.attn.traces.pending is None for b in bb.layers)
