import pytest
import torch

from statelab.testing import check_memory

from crsd_memory.hebbian import HebbianMemory, HebbianRecall
from crsd_memory.reference import hebbian_sequence

D = 16


def _reference(core: HebbianRecall, x, H0):
    """Recall and final H of the token-by-token reference, through the same projections."""
    q, k, v, _ = core._project(x)
    w = core._write_strength(x)
    r, H = hebbian_sequence(q, k, v, H0, core.gamma(), core.eta(), core.temperature, core.topk, w)  # (B, h, T, d)
    B, T = x.shape[:2]
    return core.out(r.transpose(1, 2).reshape(B, T, -1)), H


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("write_gate", [False, True])
def test_chunked_matches_reference(chunk, topk, write_gate):
    core = HebbianRecall(D, D, n_heads=2, chunk_size=chunk, topk=topk, temperature=0.5, write_gate=write_gate)
    with torch.no_grad():
        core.decay_logit.copy_(torch.tensor([-3.0, 4.0]))  # a fast and a slow head
    x = torch.randn(3, 37, D)
    H0 = torch.randn(3, 2, 8, 8)
    r, s = core(x, {"H": H0})
    r_ref, H_ref = _reference(core, x, H0)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(s["H"], H_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("write_gate", [False, True])
def test_step_matches_reference(write_gate):
    core = HebbianRecall(D, D, n_heads=4, chunk_size=8, write_gate=write_gate)
    x = torch.randn(2, 20, D)
    H = core.init_state(2)["H"]
    outs = []
    for t in range(20):
        y, s = core.step(x[:, t], {"H": H})
        H = s["H"]
        outs.append(y)
    r_ref, H_ref = _reference(core, x, core.init_state(2)["H"])
    torch.testing.assert_close(torch.stack(outs, 1), r_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(H, H_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("write_gate", [False, True])
def test_gradients_match_reference(write_gate):
    core = HebbianRecall(D, D, n_heads=2, chunk_size=4, write_gate=write_gate)
    x = torch.randn(2, 13, D)
    H0 = torch.zeros(2, 2, 8, 8)
    core(x, {"H": H0})[0].pow(2).sum().backward()
    fast = {n: p.grad.clone() for n, p in core.named_parameters()}
    core.zero_grad()
    _reference(core, x, H0)[0].pow(2).sum().backward()
    for n, p in core.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_recall_is_cosine_retrieval_of_stored_value():
    """One write then a query with the same direction returns eta * v / temperature (q_hat . k_hat = 1)."""
    core = HebbianRecall(4, 4, n_heads=1, d_head=4, temperature=0.25)
    with torch.no_grad():
        core.qkv.weight.zero_()
        core.qkv.weight[0:4].copy_(torch.eye(4) * 3.0)  # q = 3 x
        core.qkv.weight[4:8].copy_(torch.eye(4) * 0.5)  # k = x / 2
        core.qkv.weight[8:12].copy_(torch.eye(4))  # v = x
        core.out.weight.copy_(torch.eye(4))
    x = torch.tensor([[[1.0, 2.0, 0.0, 2.0]]])  # |x| = 3
    r, s = core(x)
    torch.testing.assert_close(r[0, 0], core.eta()[0] * x[0, 0] / 0.25)
    # a second key orthogonal to the first: its query recalls only its own value, nothing of the first
    x2 = torch.tensor([[2.0, -1.0, 0.0, 0.0]])
    r2, _ = core.step(x2, s)
    torch.testing.assert_close(r2[0], core.eta()[0] * x2[0] / 0.25)


def test_write_gate_stores_only_the_tokens_it_opens_for():
    """With the gate shut everywhere but one token, H holds exactly that token's write (decayed)."""
    core = HebbianRecall(D, D, n_heads=2, write_gate=True)
    x = torch.randn(1, 12, D)
    with torch.no_grad():
        core.write_gate.weight.zero_()
        core.write_gate.bias.fill_(-1e4)  # w = 0: nothing is written
    _, s = core(x)
    assert s["H"].abs().max() == 0
    # open the gate for token 5 only: a feature only that token has
    x[:, :, 0] = 0.0
    x[0, 5, 0] = 1.0
    with torch.no_grad():
        core.write_gate.weight[:, 0] = 2e4  # w_5 = sigmoid(1e4) = 1, every other token sigmoid(-1e4) = 0
    _, s = core(x)
    q, k, v, _ = core._project(x)
    g, e = core.gamma(), core.eta()
    expect = (g ** 6)[:, None, None] * e[:, None, None] * (k[0, :, 5, :, None] * v[0, :, 5, None, :])  # (h, d, d)
    torch.testing.assert_close(s["H"][0], expect, atol=1e-6, rtol=1e-5)


def test_write_gate_is_a_spec_option():
    from crsd_memory.hebbian import hebbian_kwargs
    from crsd_memory.plugin import HebbianParams

    mem = HebbianMemory(D, **hebbian_kwargs(HebbianParams(n_heads=2, write_gate=True)))
    assert mem.core.write_gate is not None and mem.core.write_gate.out_features == 2
    assert HebbianMemory(D, **hebbian_kwargs(HebbianParams(n_heads=2))).core.write_gate is None


def test_decay_and_rate_stay_in_range():
    core = HebbianRecall(D, D, n_heads=3, decay_min=0.6, decay_max=0.95, lr_max=0.3)
    with torch.no_grad():
        core.decay_logit.copy_(torch.tensor([-1e4, 0.0, 1e4]))
        core.rate_logit.copy_(torch.tensor([-1e4, 0.0, 1e4]))
    g, e = core.gamma(), core.eta()
    assert g.min() >= 0.6 - 1e-6 and g.max() <= 0.95 + 1e-6
    assert e.min() >= 0.0 and e.max() <= 0.3 + 1e-6
    y, s = core(torch.randn(2, 50, D))
    assert torch.isfinite(y).all() and torch.isfinite(s["H"]).all()


def test_topk_keeps_k_entries_per_head():
    core = HebbianRecall(D, D, n_heads=2, topk=2)
    x = torch.randn(2, 9, D)
    q, k, v, _ = core._project(x)
    r, _ = hebbian_sequence(q, k, v, torch.zeros(2, 2, 8, 8), core.gamma(), core.eta(), 1.0, 2)
    assert ((r != 0).sum(-1) == 2).all()


def test_detach_blocks_gradient_through_writes():
    mem = HebbianMemory(D, n_heads=2, detach=True)
    x = torch.randn(2, 10, D)
    y, s, _ = mem(x)
    y.pow(2).sum().backward()
    assert mem.core.decay_logit.grad is None and mem.core.rate_logit.grad is None
    qkv = mem.core.qkv.weight.grad  # (3 * h * d, D): rows of q, then k, then v
    n = qkv.shape[0] // 3
    assert qkv[:n].abs().sum() > 0  # the query still learns
    assert qkv[n:].abs().sum() == 0  # keys and values get nothing
    assert not s["H"].requires_grad


def test_state_is_fp32_under_bf16_autocast():
    mem = HebbianMemory(D, n_heads=2, chunk_size=4)
    x = torch.randn(2, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s, _ = mem(x)
        y2, s2, _ = mem.step(x[:, 0], s)
    assert s["H"].dtype == torch.float32 and s2["H"].dtype == torch.float32
    y32, s32, _ = mem(x)
    torch.testing.assert_close(s["H"], s32["H"], atol=0.05, rtol=0.05)  # bf16 projections, fp32 memory


@pytest.mark.parametrize("kw", [dict(), dict(topk=3, chunk_size=5), dict(temperature=0.3, chunk_size=4),
                                dict(write_gate=True, chunk_size=4)])
def test_conformance(kw):
    check_memory(lambda: HebbianMemory(D, n_heads=2, **kw), D)


def test_conformance_detached():
    check_memory(lambda: HebbianMemory(D, n_heads=2, detach=True), D, allow_unused=["decay_logit", "rate_logit"])
    check_memory(lambda: HebbianMemory(D, n_heads=2, detach=True, write_gate=True), D,
                 allow_unused=["decay_logit", "rate_logit", "write_gate.weight", "write_gate.bias"])
