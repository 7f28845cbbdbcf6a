"""Learned eviction (straight-through): the forward pass is the hard buffer's, and an evicted
entry that a later query needed gets a gradient that raises its importance."""

import pytest
import torch

from statelab.testing import check_memory

from crsd_memory.episodic import EpisodicMemory, EpisodicRecall, episodic_chunked
from crsd_memory.reference import episodic_sequence

D = 16


@pytest.mark.parametrize("kw", [dict(slots=4, chunk_size=5), dict(slots=3, chunk_size=8, topk=2),
                                dict(slots=5, chunk_size=6, window=4), dict(slots=40, chunk_size=7)])
def test_straight_through_forward_is_the_hard_buffer(kw):
    core = EpisodicRecall(D, D, temperature=0.2, eviction="straight-through", **kw)
    x = torch.randn(3, 29, D)
    r, s = core(x)
    q, k, v, z = core._project(x)
    r_ref, s_ref = episodic_sequence(q, k, v, z, core.init_state(3), temperature=core.temperature, topk=core.topk,
                                     window=core.window, recency=core.recency)
    torch.testing.assert_close(r, core.out(r_ref), atol=1e-5, rtol=0)
    assert torch.equal(s["slot_t"], s_ref["slot_t"])


def _evicted_entry_gradient(evict_temperature):
    """Token 0 (key e0, importance 0) is pushed out by four entries of importance 1 (key e1); the
    last token queries e0 and the loss rewards recalling token 0's value."""
    e = torch.eye(4)
    q = torch.stack([e[1]] * 5 + [e[0]])[None]  # (1, 6, 4)
    k = torch.stack([e[0]] + [e[1]] * 5)[None]
    v = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    z = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, -5.0]], requires_grad=True)
    state = EpisodicRecall(4, 4, slots=2, d_key=4).init_state(1)
    r, s = episodic_chunked(q, k, v, z, state, chunk_size=8, temperature=0.1, topk=None, window=None, recency=0.0,
                            evict_temperature=evict_temperature)
    assert 0 not in s["slot_t"][0].tolist()  # token 0 was evicted
    (-(r[0, 5] * v[0, 0]).sum()).backward()
    return r.detach(), z.grad[0, 0].item()


def test_an_evicted_entry_learns_to_stay_only_with_straight_through():
    r_hard, g_hard = _evicted_entry_gradient(None)
    r_st, g_st = _evicted_entry_gradient(1.0)
    torch.testing.assert_close(r_st, r_hard, atol=0, rtol=0)
    assert g_hard == 0.0
    assert g_st < -1e-3  # raising token 0's importance lowers the loss


def test_eviction_is_a_spec_option():
    from crsd_memory.episodic import episodic_kwargs
    from crsd_memory.plugin import EpisodicParams

    mem = EpisodicMemory(D, **episodic_kwargs(EpisodicParams(slots=4, eviction="straight-through",
                                                             eviction_temperature=0.5)))
    assert mem.core.evict_temperature == 0.5
    assert EpisodicMemory(D, **episodic_kwargs(EpisodicParams(slots=4))).core.evict_temperature is None


def test_conformance():
    check_memory(lambda: EpisodicMemory(D, slots=4, chunk_size=5, eviction="straight-through"), D)
