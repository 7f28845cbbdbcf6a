import math

import pytest
import torch
import torch.nn.functional as F

import statelab
from statelab.data import Batch, DataSource
from statelab.interfaces import ProbeContext

from crsd_memory.probe import MemoryUseProbe

V = 64


def in_context_batch(g: torch.Generator, B: int, T: int, k: int = 4):
    """Each row draws its tokens from its own random subset of k ids: without context the best
    loss is log V; a model that remembers which ids it has seen approaches log k."""
    subset = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B)])  # (B, k)
    seq = subset.gather(1, torch.randint(0, k, (B, T + 1), generator=g))  # (B, T+1)
    return seq[:, :-1], seq[:, 1:]


class InContextData(DataSource):
    kind = "in-context"

    def val_batches(self, batch_size, seq_len, max_batches=None):
        g = torch.Generator().manual_seed(123)
        for _ in range(max_batches or 2):
            x, y = in_context_batch(g, batch_size, seq_len)
            yield Batch(x, y)


def model_with(registry, mem):
    # a stateless backbone: whatever it knows about the context comes through the memory
    return statelab.build({"name": "p", "model": {"d_model": 32, "vocab_size": V, "backbone": {"kind": "toy-mlp"},
                                                   "memories": [{**mem, "after_layer": 0}]},
                           "tracking": {"enabled": False}}, registry=registry)


def probe(model):
    ctx = ProbeContext(extra={"data": InContextData()})
    return MemoryUseProbe(batches=2, batch_size=8, seq_len=32).run(model, ctx)


def test_trained_memory_is_used(registry):
    torch.manual_seed(0)
    model = model_with(registry, {"kind": "hebbian", "n_heads": 2})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = in_context_batch(g, 16, 32)
        loss = F.cross_entropy(model(x)[0].reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = probe(model)
    # the memory lets a context-free backbone beat the context-free optimum log V by a wide margin
    assert res.metrics["loss"] < math.log(V) - 0.5
    # and removing its recall costs most of that gain
    assert res.metrics["delta"] > 0.3 and res.verdict == "used" and res.passed
    assert model.training  # the probe restores the mode it found


def test_closed_gate_is_unused_and_losses_match_a_manual_ablation(registry):
    model = model_with(registry, {"kind": "episodic", "slots": 4})
    res = probe(model)
    # forcing the recall to zero is the same as a memory whose output projection is zero
    with torch.no_grad():
        model.memories[0].core.out.weight.zero_()
    res_zeroed = probe(model)
    assert res_zeroed.metrics["loss"] == pytest.approx(res.metrics["loss_without_recall"], abs=1e-6)
    assert res_zeroed.metrics["delta"] == 0.0 and res_zeroed.verdict == "unused" and res_zeroed.passed is False


def test_windows_of_val_tokens_and_clear_error_without_data(registry):
    model = model_with(registry, {"kind": "dual", "hebbian": {"n_heads": 2}, "episodic": {"slots": 4}})
    toks = torch.randint(0, V, (500,))
    res = MemoryUseProbe(batches=2, batch_size=4, seq_len=16).run(model, ProbeContext(val_tokens=toks))
    assert set(res.metrics) == {"loss", "loss_without_recall", "delta", "relative_delta", "threshold"}
    assert res.verdict in ("used", "unused")
    model.spec = None
    with pytest.raises(ValueError, match="memory-use probe: no validation data"):
        MemoryUseProbe().run(model, ProbeContext())
