"""The Hebbian memory's options beyond the seed (delta rule, per-token decay, key convolution):
chunked forms against the token-by-token references, values and gradients, across chunk
boundaries and a remainder."""

import pytest
import torch

from statelab.testing import check_memory

from crsd_memory.delta import memory_chunked
from crsd_memory.hebbian import HebbianMemory, HebbianRecall, hebbian_chunked
from crsd_memory.reference import causal_conv_sequence, memory_sequence, unit

D = 16
OPTIONS = [
    dict(rule="delta"),
    dict(rule="delta", write_gate=True),
    dict(decay="token"),
    dict(rule="delta", decay="token", write_gate=True),
    dict(key_conv=4),
    dict(rule="delta", decay="token", write_gate=True, key_conv=3),
]


def _inputs(B=2, h=3, T=37, d=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    q, k = (unit(torch.randn(B, h, T, d, generator=g, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, h, T, d, generator=g, dtype=dtype)
    H = torch.randn(B, h, d, d, generator=g, dtype=dtype)
    log_a = -torch.rand(B, h, T, generator=g, dtype=dtype) * 0.3
    beta = torch.rand(B, h, T, generator=g, dtype=dtype) * 1.5
    return [q, k, v, H, log_a, beta]


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_memory_chunked_matches_sequence_fp64(delta, chunk):
    """Values and gradients of every input (q, k, v, H0, log decay, write strength), T = 37."""
    fast_in = [t.requires_grad_() for t in _inputs()]
    ref_in = [t.detach().clone().requires_grad_() for t in fast_in]
    r, H = memory_chunked(*fast_in, delta, 0.7, None, chunk)
    r_ref, H_ref = memory_sequence(*ref_in, delta, 0.7, None)
    torch.testing.assert_close(r, r_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(H, H_ref, atol=1e-12, rtol=0)
    w = torch.randn_like(r)
    ((r * w).sum() + H.pow(2).sum()).backward()
    ((r_ref * w).sum() + H_ref.pow(2).sum()).backward()
    for name, a, b in zip("q k v H log_a beta".split(), fast_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_general_form_reduces_to_the_seed_rule():
    """Hebbian write with one decay per head: the general chunked form equals the seed's."""
    q, k, v, H, _, _ = _inputs(dtype=torch.float32)
    gamma, eta = torch.tensor([0.5, 0.9, 0.999]), torch.tensor([0.2, 0.5, 1.0])
    r1, H1 = hebbian_chunked(q, k, v, H, gamma, eta, 0.5, 2, 8)
    r2, H2 = memory_chunked(q, k, v, H, torch.log(gamma)[:, None], eta[:, None], False, 0.5, 2, 8)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(H1, H2, atol=1e-5, rtol=1e-5)


def test_delta_rule_overwrites_and_hebbian_superposes():
    """Two writes to the same key with beta = 1 and no decay: the delta rule recalls the second
    value exactly; the Hebbian rule recalls their sum."""
    k = unit(torch.randn(1, 1, 1, 4)).expand(1, 1, 2, 4)
    v = torch.randn(1, 1, 2, 4)
    zero, one = torch.zeros(1, 1, 2), torch.ones(1, 1, 2)
    H0 = torch.zeros(1, 1, 4, 4)
    r_delta, _ = memory_chunked(k, k, v, H0, zero, one, True, 1.0, None, 2)
    r_hebb, _ = memory_chunked(k, k, v, H0, zero, one, False, 1.0, None, 2)
    torch.testing.assert_close(r_delta[0, 0, 1], v[0, 0, 1])
    torch.testing.assert_close(r_hebb[0, 0, 1], v[0, 0, 0] + v[0, 0, 1])


def test_causal_conv_matches_reference_and_continues():
    core = HebbianRecall(D, D, n_heads=2, key_conv=4)
    x = torch.randn(2, 11, 16)
    past = torch.randn(2, 3, 16)
    y, nxt = core._conv_keys(x, past)
    y_ref, nxt_ref = causal_conv_sequence(x, core.conv_weight, past)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nxt, nxt_ref)
    y1, s1 = core._conv_keys(x[:, :5], past)  # two calls, the second from the first's state
    y2, _ = core._conv_keys(x[:, 5:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-6, rtol=1e-5)


def _module_reference(core: HebbianRecall, x, state):
    """The memory token by token: convolution, projections and write all from the references."""
    B, T, _ = x.shape
    q, k, v = core.qkv(x).float().chunk(3, dim=-1)
    if core.key_conv is not None:
        k, _ = causal_conv_sequence(k, core.conv_weight, state["conv"])
    q, k, v = (z.view(B, T, core.n_heads, core.d_head).transpose(1, 2) for z in (q, k, v))
    w = core._write_strength(x)
    beta = core.eta()[:, None] if w is None else core.eta()[:, None] * w
    log_a = core._log_decay(x, core.gamma())
    r, H = memory_sequence(unit(q), unit(k), v, state["H"], log_a, beta, core.rule == "delta",
                           core.temperature, core.topk)
    return core.out(r.transpose(1, 2).reshape(B, T, -1)), H


@pytest.mark.parametrize("kw", OPTIONS)
def test_module_matches_reference_values_and_gradients(kw):
    core = HebbianRecall(D, D, n_heads=2, chunk_size=8, temperature=0.5, **kw)
    x = torch.randn(2, 21, D)
    state = core.init_state(2)
    state["H"] = torch.randn_like(state["H"]) * 0.3
    if "conv" in state:
        state["conv"] = torch.randn_like(state["conv"])
    r, s = core(x, state)
    r_ref, H_ref = _module_reference(core, x, state)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s["H"], H_ref, atol=1e-5, rtol=1e-5)
    r.pow(2).sum().backward()
    fast = {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}
    core.zero_grad()
    _module_reference(core, x, state)[0].pow(2).sum().backward()
    for n, p in core.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    assert set(fast) == {n for n, p in core.named_parameters() if p.grad is not None}


def test_token_decay_starts_near_one():
    core = HebbianRecall(D, D, n_heads=4, decay="token")
    a = torch.exp(core._log_decay(torch.randn(3, 50, D) * 0.0, core.gamma()))  # zero input: the biases
    torch.testing.assert_close(a[0, :, 0], torch.linspace(0.95, 0.999, 4), atol=1e-5, rtol=0)
    a = torch.exp(core._log_decay(torch.nn.functional.layer_norm(torch.randn(3, 50, D), (D,)), core.gamma()))
    assert a.min() > 0.85 and a.max() < 1.0


def test_options_are_spec_fields_with_checks():
    from pydantic import ValidationError

    from crsd_memory.hebbian import hebbian_kwargs
    from crsd_memory.plugin import HebbianParams

    mem = HebbianMemory(D, **hebbian_kwargs(HebbianParams(n_heads=2, rule="delta", decay="token", key_conv=4)))
    assert (mem.core.rule, mem.core.decay, mem.core.key_conv) == ("delta", "token", 4) and not mem.core.faithful
    assert HebbianMemory(D, **hebbian_kwargs(HebbianParams(n_heads=2))).core.faithful
    with pytest.raises(ValidationError, match="rule delta needs lr_max <= 2"):
        HebbianParams(rule="delta", lr_max=3.0)
    with pytest.raises(ValidationError, match="key_conv"):
        HebbianParams(key_conv=1)


@pytest.mark.parametrize("kw", OPTIONS)
def test_conformance(kw):
    check_memory(lambda: HebbianMemory(D, n_heads=2, chunk_size=4, **kw), D)
