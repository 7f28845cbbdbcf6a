import torch

import statelab
from statelab.testing import check_memory

from crsd_memory.dual import DualMemory

D = 16
SMALL = dict(hebbian=dict(n_heads=2, chunk_size=4), episodic=dict(slots=4, chunk_size=5))


def test_conformance():
    check_memory(lambda: DualMemory(D, **SMALL), D)


def test_publishes_gate_norms_and_recall():
    mem = DualMemory(D, **SMALL)
    x = torch.randn(2, 6, D)
    y, s, aux = mem(x)
    assert set(aux) == {"memory.gate", "memory.hebbian_norm", "memory.episodic_norm", "memory.recall"}
    g = aux["memory.gate"]
    assert g.shape == (2, 6, D) and (g > 0).all() and (g < 1).all()
    assert aux["memory.hebbian_norm"].shape == (2, 6)
    torch.testing.assert_close(y, x + aux["memory.recall"])
    # the merge is g * hebbian + (1 - g) * episodic
    rh, _ = mem.core.hebbian(mem.norm(x))
    re, _ = mem.core.episodic(mem.norm(x))
    torch.testing.assert_close(aux["memory.recall"], g * rh + (1 - g) * re)
    torch.testing.assert_close(aux["memory.hebbian_norm"], rh.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert set(s) == {"hebb_H", "epi_keys", "epi_values", "epi_prio", "epi_slot_t", "epi_t"}


def test_intervention_removes_the_memory():
    mem = DualMemory(D, **SMALL)
    x = torch.randn(2, 6, D)
    with statelab.intervene({"memory.recall": 0.0}):
        y, _, _ = mem(x)
        y_t, _, _ = mem.step(x[:, 0])
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    torch.testing.assert_close(y_t, x[:, 0], atol=0, rtol=0)
