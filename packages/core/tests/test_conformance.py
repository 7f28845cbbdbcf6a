"""The conformance kit passes the toys and catches broken implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from statelab.interfaces import Backbone, Layer, Memory
from statelab.testing import check_backbone, check_causality, check_forward_then_step, check_memory, check_shapes
from statelab.testing.toys import ToyEMAMemory, ToyMLP, ToyRNN


def test_toys_pass():
    check_backbone(lambda: ToyRNN(16, n_layers=2, d_state=8), 16)
    check_backbone(lambda: ToyMLP(16, n_layers=2), 16)
    check_memory(lambda: ToyEMAMemory(16), 16)


class PeekingLayer(Layer):
    """Broken on purpose: position t sees t+1 (non-causal)."""

    def __init__(self, d):
        super().__init__()
        self.d_model = d
        self.lin = nn.Linear(d, d)

    def forward(self, x, state=None):
        nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)
        return x + self.lin(nxt), {}, {}


class ForgetfulMemory(Memory):
    """Broken on purpose: step ignores the carried state (forward-then-step differs)."""

    def __init__(self, d):
        super().__init__()
        self.d_model = d

    def init_state(self, batch_size, device=None, dtype=None):
        return {"s": torch.zeros(batch_size, self.d_model, device=device)}

    def forward(self, x, state=None):
        s = state["s"] if state else torch.zeros_like(x[:, 0])
        y = x + s[:, None] + x.cumsum(1)
        return y, {"s": s + x.sum(1)}, {}

    def step(self, x_t, state=None):
        return x_t + x_t, {"s": state["s"] + x_t}, {}


class WrongShape(Layer):
    def __init__(self, d):
        super().__init__()
        self.d_model = d

    def forward(self, x, state=None):
        return x[..., :-1], {}, {}


def _bb(layer_cls, d=8):
    bb = Backbone(d)
    bb.layers = nn.ModuleList([layer_cls(d)])
    return bb


def test_kit_catches_a_non_causal_layer():
    with pytest.raises(AssertionError, match=r"causality \(outputs before t=5\): max abs diff"):
        check_causality(_bb(PeekingLayer), 8, T=12, t0=5)


def test_kit_catches_a_step_that_ignores_state():
    with pytest.raises(AssertionError, match="forward-then-step outputs: max abs diff"):
        check_forward_then_step(ForgetfulMemory(8), 8)


def test_kit_catches_wrong_shapes():
    with pytest.raises(AssertionError, match=r"shapes: forward returned \(2, 8, 7\), expected \(2, 8, 8\)"):
        check_shapes(_bb(WrongShape), 8)


def test_kit_catches_a_parameter_without_gradient():
    class Dead(ToyRNN):
        def __init__(self, d):
            super().__init__(d, 1, 4)
            self.unused = nn.Parameter(torch.ones(3))

    with pytest.raises(AssertionError, match=r"gradients: no \(or non-finite\) gradient reaches \['unused'\]"):
        check_backbone(lambda: Dead(8), 8)
