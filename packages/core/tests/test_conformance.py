"""The conformance kit passes the toys and catches broken implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from statelab.interfaces import Backbone, Layer, Memory, StatefulModule
from statelab.testing import (
    check_backbone,
    check_batch_independence,
    check_causality,
    check_chunked_forward,
    check_determinism,
    check_forward_then_step,
    check_injection,
    check_memory,
    check_model,
    check_publishes,
    check_shapes,
    check_state_roundtrip,
    default_length,
)
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


# --- each check rejects a toy broken in the way it looks for ------------------------------


class EMA(Memory):
    """A correct running sum memory, ``s_t = 0.5 s_{t-1} + x_t``; subclasses break one thing each."""

    def __init__(self, d):
        super().__init__()
        self.d_model = d
        self.lin = nn.Linear(d, d)

    def init_state(self, batch_size, device=None, dtype=None):
        return {"s": torch.zeros(batch_size, self.d_model, device=device)}

    def _scan(self, x, s):
        outs = []
        for t in range(x.shape[1]):
            s = 0.5 * s + x[:, t]
            outs.append(s)
        return torch.stack(outs, 1), s

    def forward(self, x, state=None):
        s = state["s"] if state else torch.zeros_like(x[:, 0])
        hs, s = self._scan(x, s)
        return x + self.lin(hs), {"s": s}, {}

    def step(self, x_t, state=None):
        y, s, aux = self.forward(x_t[:, None], state)
        return y[:, 0], s, aux


class InPlaceForward(EMA):
    def forward(self, x, state=None):
        if state:
            state["s"].mul_(1.0).add_(1.0)  # corrupts the caller's state
        return super().forward(x, state)


class InPlaceStep(EMA):
    def step(self, x_t, state=None):
        s = state["s"]
        s.mul_(0.5).add_(x_t)
        return x_t + self.lin(s), {"s": s}, {}


class IgnoresIncomingState(EMA):
    def forward(self, x, state=None):
        return super().forward(x, None)

    def step(self, x_t, state=None):
        return super().forward(x_t[:, None], state)[0][:, 0], super().forward(x_t[:, None], state)[1], {}


class HiddenState(EMA):
    """Keeps part of its state on the module, where a saved state cannot carry it."""

    def forward(self, x, state=None):
        y, s, aux = super().forward(x, state)
        self.calls = getattr(self, "calls", 0) + 1
        return y + self.calls, s, aux


class MixesRows(EMA):
    def forward(self, x, state=None):
        y, s, aux = super().forward(x, state)
        return y + y.mean(0, keepdim=True), s, aux


class Noisy(EMA):
    def forward(self, x, state=None):
        y, s, aux = super().forward(x, state)
        return y + torch.randn_like(y), s, aux


class ChunkedEMA(EMA):
    """A chunked fast path whose carry across chunk boundaries is lost (the bug default T finds)."""

    chunk_size = 8

    def forward(self, x, state=None):
        s = state["s"] if state else torch.zeros_like(x[:, 0])
        ys = []
        for i in range(0, x.shape[1], self.chunk_size):
            hs, s_end = self._scan(x[:, i : i + self.chunk_size], s if i == 0 else torch.zeros_like(s))
            ys.append(hs)
            s = s_end
        return x + self.lin(torch.cat(ys, 1)), {"s": s}, {}

    def step(self, x_t, state=None):
        return EMA.forward(self, x_t[:, None], state)[0][:, 0], EMA.forward(self, x_t[:, None], state)[1], {}


class BadIngest(EMA):
    def ingest(self, h, state=None):
        return state if state is not None else self.init_state(h.shape[0])


class InPlaceInject(ToyRNN):
    def inject(self, state, target, alpha):
        for k, v in target.items():
            a = torch.as_tensor(alpha).reshape(-1, *[1] * (v.dim() - 1)) if torch.as_tensor(alpha).dim() else alpha
            state[k].mul_(1 - a).add_(a * v)
        return state


def test_the_correct_toy_passes_every_check():
    check_memory(lambda: EMA(8), 8)


def test_forward_that_modifies_its_incoming_state_is_caught():
    with pytest.raises(AssertionError, match=r"forward modified its incoming state in place \(entry 's'\)"):
        check_chunked_forward(InPlaceForward(8).eval(), 8)


def test_step_that_modifies_its_incoming_state_is_caught():
    with pytest.raises(AssertionError, match=r"step \(t=5\) modified its incoming state in place"):
        check_forward_then_step(InPlaceStep(8).eval(), 8)


def test_in_place_inject_is_caught():
    with pytest.raises(AssertionError, match="inject modified its incoming state in place"):
        check_injection(InPlaceInject(8, 1, 4), 8)


def test_forward_that_ignores_its_incoming_state_is_caught():
    with pytest.raises(AssertionError, match="chunked forward outputs: max abs diff"):
        check_chunked_forward(IgnoresIncomingState(8).eval(), 8)


def test_state_kept_outside_the_state_dict_is_caught():
    with pytest.raises(AssertionError, match="state roundtrip continuation: max abs diff"):
        check_state_roundtrip(HiddenState(8).eval(), 8)


def test_rows_that_see_each_other_are_caught():
    with pytest.raises(AssertionError, match=r"batch independence \(row 0 output\)"):
        check_batch_independence(MixesRows(8).eval(), 8)


def test_nondeterminism_is_caught():
    x = torch.randn(2, 5, 8)
    with pytest.raises(AssertionError, match="determinism: outputs differ"):
        check_determinism(lambda: Noisy(8), lambda m: m(x)[0])


def test_default_length_crosses_chunk_boundaries():
    assert default_length(ChunkedEMA(8)) == 2 * 8 + 4 + 1 and default_length(EMA(8)) == 12
    assert default_length(nn.Sequential(ChunkedEMA(8), type("C", (nn.Module,), {"chunk_size": 64})())) == 161
    check_chunked_forward(ChunkedEMA(8).eval(), 8, T=8, split=3)  # within one chunk the bug is invisible
    with pytest.raises(AssertionError, match="forward-then-step outputs: max abs diff"):
        check_forward_then_step(ChunkedEMA(8).eval(), 8)  # the default T crosses two boundaries


def test_memory_checks_type_and_ingest():
    class Plain(StatefulModule):  # the EMA's computation, but not declared a Memory
        def __init__(self, d):
            super().__init__()
            self.d_model, self.inner = d, EMA(d)

        def init_state(self, batch_size, device=None, dtype=None):
            return self.inner.init_state(batch_size, device, dtype)

        def forward(self, x, state=None):
            return self.inner(x, state)

        def step(self, x_t, state=None):
            return self.inner.step(x_t, state)

    with pytest.raises(AssertionError, match="memory: Plain is not a statelab.Memory"):
        check_memory(lambda: Plain(8), 8)
    with pytest.raises(AssertionError, match=r"ingest state \(vs forward's\)"):
        check_memory(lambda: BadIngest(8), 8)


def test_declared_internals_that_are_never_published_are_caught():
    check_publishes(ToyRNN(8, 1, 4).eval(), ["toy.gate"], 8)
    with pytest.raises(AssertionError, match=r"publishes: declared \['toy.nope'\] but forward/step publish only \['toy.gate'\]"):
        check_publishes(ToyRNN(8, 1, 4).eval(), ["toy.gate", "toy.nope"], 8)


def test_model_whose_component_declares_an_unpublished_internal_is_caught():
    import statelab
    from statelab.plugins import Component, Registry, hookimpl
    from statelab.testing.toys import ToyRNNParams, toy_spec

    class Plugin:
        STATELAB_PLUGIN_API = 1

        @hookimpl
        def statelab_components(self):
            return [Component("backbone", "toy-rnn", ToyRNNParams, lambda p, c: ToyRNN(c.d_model, p.n_layers, p.d_state),
                              publishes=["toy.gate", "toy.never"])]

    reg = Registry()
    reg.register_plugin(Plugin(), distribution="test")
    with pytest.raises(AssertionError, match=r"backbone 'toy-rnn' declares \['toy.never'\], which the model's forward/step never"):
        check_model(lambda: statelab.build(toy_spec(), vocab_size=32, registry=reg))
