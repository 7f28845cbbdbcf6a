import pytest
import torch

from statelab.testing import check_memory

from crsd_memory.episodic import EpisodicMemory, EpisodicRecall
from crsd_memory.reference import episodic_sequence

D = 16


def _run_reference(core: EpisodicRecall, x, state):
    q, k, v, z = core._project(x)
    r, s = episodic_sequence(q, k, v, z, dict(state), temperature=core.temperature, topk=core.topk,
                             window=core.window, recency=core.recency)
    return core.out(r), s


CONFIGS = [
    dict(slots=4, chunk_size=5),
    dict(slots=4, chunk_size=1),
    dict(slots=6, chunk_size=64),
    dict(slots=40, chunk_size=7),  # more slots than tokens: never full
    dict(slots=3, chunk_size=8, topk=2),
    dict(slots=5, chunk_size=6, window=4),
    dict(slots=5, chunk_size=6, window=3, topk=1),
    dict(slots=4, chunk_size=5, recency=0.0),  # pure importance: the all-time top 4 stay
    dict(slots=4, chunk_size=5, recency=10.0),  # recency dominates: the last 4 tokens
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_fast_matches_reference(kw):
    core = EpisodicRecall(D, D, temperature=0.2, **kw)
    x = torch.randn(3, 29, D)
    # a non-empty incoming state, from an earlier segment
    _, s0 = _run_reference(core, torch.randn(3, 9, D), core.init_state(3))
    r, s = core(x, s0)
    r_ref, s_ref = _run_reference(core, x, s0)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=0)
    # the same entries in the same slots: write times and counters are identical, not just close
    assert torch.equal(s["slot_t"], s_ref["slot_t"]) and torch.equal(s["t"], s_ref["t"])
    for key in ("keys", "values", "prio"):
        torch.testing.assert_close(s[key], s_ref[key], atol=1e-6, rtol=0)


def test_gradients_match_reference():
    core = EpisodicRecall(D, D, slots=4, chunk_size=4, temperature=0.3)
    x = torch.randn(2, 15, D)
    core(x)[0].pow(2).sum().backward()
    fast = {n: p.grad.clone() for n, p in core.named_parameters()}
    core.zero_grad()
    _run_reference(core, x, core.init_state(2))[0].pow(2).sum().backward()
    for n, p in core.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def _scripted(slots, recency, z, **kw):
    """A buffer whose importance is exactly the input's first channel (keys/values the rest)."""
    core = EpisodicRecall(4, 4, slots=slots, d_key=4, recency=recency, **kw)
    with torch.no_grad():
        core.importance.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        core.importance.bias.zero_()
    x = torch.randn(1, len(z), 4)
    x[0, :, 0] = torch.tensor(z)
    return core, x


def test_buffer_keeps_highest_priorities_and_replaces_lowest():
    z = [0.5, 3.0, -1.0, 2.0, 0.1, 4.0, -2.0]
    core, x = _scripted(3, 0.0, z)
    _, s = core(x)
    assert s["slot_t"][0].tolist() == [5, 1, 3]  # priorities 4, 3, 2, in canonical (descending) order
    torch.testing.assert_close(s["prio"][0], torch.tensor([4.0, 3.0, 2.0]))
    assert s["t"].tolist() == [7]
    # with recency 1 per step the newest entries win: after 7 tokens u = z + t
    core, x = _scripted(3, 1.0, z)
    _, s = core(x)
    # u = z + t = 0.5, 4, 1, 5, 4.1, 9, 4
    assert s["slot_t"][0].tolist() == [5, 3, 4]  # 9, 5, 4.1


def test_ties_go_to_the_newest_entry():
    core, x = _scripted(2, 0.0, [1.0, 1.0, 1.0])
    _, s = core(x)
    assert s["slot_t"][0].tolist() == [2, 1]


def test_empty_slots_and_zero_vectors_are_safe():
    core = EpisodicRecall(D, D, slots=4, chunk_size=3, window=2)
    x = torch.zeros(2, 7, D, requires_grad=True)
    r, s = core(x)
    r.sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(x.grad).all()
    for p in core.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    # a step on the fresh state (all slots empty before the write) is finite too
    y, _ = core.step(torch.zeros(2, D), None)
    assert torch.isfinite(y).all()


def test_window_with_nothing_recent_recalls_zero():
    """window=1 keeps only the current token; a current token below every priority is not written."""
    core, x = _scripted(2, 0.0, [5.0, 4.0, -3.0], window=1)
    r, s = core(x)
    with torch.no_grad():
        assert r[0, 2].abs().max() == 0  # nothing written at t=2 and the two slots are older than 1 step
        assert r[0, 1].abs().max() > 0


def test_importance_learns_through_recall():
    mem = EpisodicMemory(D, slots=4)
    x = torch.randn(2, 10, D)
    mem(x)[0].pow(2).sum().backward()
    assert mem.core.importance.weight.grad.abs().sum() > 0


def test_detach_blocks_gradient_through_writes():
    mem = EpisodicMemory(D, slots=4, detach=True)
    x = torch.randn(2, 10, D)
    y, s, _ = mem(x)
    y.pow(2).sum().backward()
    assert mem.core.importance.weight.grad is None
    n = mem.core.qkv.weight.shape[0] // 3
    assert mem.core.qkv.weight.grad[:n].abs().sum() > 0 and mem.core.qkv.weight.grad[n:].abs().sum() == 0
    assert not any(v.requires_grad for v in s.values())


@pytest.mark.parametrize("kw", [dict(slots=4, chunk_size=5), dict(slots=3, topk=2, window=5, chunk_size=4)])
def test_conformance(kw):
    check_memory(lambda: EpisodicMemory(D, **kw), D)


def test_conformance_detached():
    check_memory(lambda: EpisodicMemory(D, slots=4, detach=True), D, allow_unused=["importance"])
