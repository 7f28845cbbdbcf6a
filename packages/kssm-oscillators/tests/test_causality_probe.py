"""The `causality` probe on models where the answer is known by construction."""

import json
from typing import Literal

import pytest
import statelab
import torch
from pydantic import BaseModel, ConfigDict, Field
from statelab.interfaces import Backbone, Layer, ProbeContext
from statelab.internals import publish
from statelab.plugins import Component, hookimpl
from torch import nn

from kssm_oscillators.causality import sign_flip_pvalue


class SignalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(1, ge=1, description="layers")
    mode: Literal["only-path", "disconnected", "constant"] = Field(description="how test.signal reaches the output")


class SignalLayer(Layer):
    """Publishes ``test.signal`` s = sigmoid(w . LN(x)) (B, T, 1) and outputs
    only-path: ``s * c`` (the signal is the only way from input to output);
    disconnected: ``tanh(W x)`` (s is computed and never used);
    constant: s = 0.5 always, output ``s * tanh(W x)``."""

    def __init__(self, d_model: int, mode: str) -> None:
        super().__init__()
        self.d_model, self.mode = d_model, mode
        self.norm = nn.LayerNorm(d_model)
        self.w = nn.Linear(d_model, 1)
        nn.init.normal_(self.w.weight, std=3.0 / d_model**0.5)
        self.c = nn.Parameter(torch.randn(d_model) * 10)
        self.W = nn.Linear(d_model, d_model)
        nn.init.normal_(self.W.weight, std=30.0)

    def forward(self, x, state=None):
        aux = {}
        if self.mode == "constant":
            s = publish(aux, "test.signal", torch.full_like(x[..., :1], 0.5))
            return s * torch.tanh(self.W(x)), {}, aux
        s = publish(aux, "test.signal", torch.sigmoid(self.w(self.norm(x))))
        if self.mode == "only-path":
            return s * self.c, {}, aux
        return torch.tanh(self.W(x)), {}, aux


class SignalBackbone(Backbone):
    def __init__(self, d_model: int, mode: str) -> None:
        super().__init__(d_model)
        self.layers = nn.ModuleList([SignalLayer(d_model, mode)])


class SignalPlugin:
    STATELAB_PLUGIN_API = 1

    @hookimpl
    def statelab_components(self):
        return [Component("backbone", "signal-test", SignalParams, lambda p, c: SignalBackbone(c.d_model, p.mode),
                          "test backbone", publishes=["test.signal"])]


def _model(spec, registry, mode):
    return statelab.build(spec(backbone={"kind": "signal-test", "mode": mode}), registry=registry)


@pytest.fixture
def signal_registry(registry):
    registry.register_plugin(SignalPlugin(), distribution="kssm-tests", version="0")
    return registry


def _probe(model, registry, **params):
    return statelab.make_probe("causality", {"n_inputs": 12, "seq_len": 16, **params}, model, registry=registry)


def _ctx(tmp_path):
    return ProbeContext(val_tokens=torch.randint(0, 24, (2000,), generator=torch.Generator().manual_seed(5)),
                        out_dir=tmp_path, seed=0)


def test_only_path_internal_is_causal(spec, signal_registry, tmp_path):
    model = _model(spec, signal_registry, "only-path")
    res = _probe(model, signal_registry, internal="test.signal").run(model, _ctx(tmp_path))
    m = res.metrics
    assert res.verdict == "causal" and res.passed is True
    assert m["std"] > 0.05 and m["variance_passed"] == 1.0
    assert m["intervention_p"] == pytest.approx(2 / 2**12)  # exact test: only the identity and its mirror
    assert m["intervention_kl"] > 0.01
    assert m["entropy_r"] < -0.9  # a larger signal sharpens the logits: entropy falls
    assert json.loads((tmp_path / "causality.json").read_text())["verdict"] == "causal"


def test_disconnected_internal_is_epiphenomenal(spec, signal_registry, tmp_path):
    model = _model(spec, signal_registry, "disconnected")
    res = _probe(model, signal_registry, internal="test.signal").run(model, _ctx(tmp_path))
    assert res.verdict == "epiphenomenal" and res.passed is False
    assert res.metrics["intervention_passed"] == 0.0
    assert res.metrics["variance_passed"] == 1.0  # it varies...
    assert res.metrics["intervention_p"] == 1.0 and res.metrics["intervention_kl"] == 0.0  # ...but forcing it does nothing


def test_constant_internal_is_constant(spec, signal_registry, tmp_path):
    model = _model(spec, signal_registry, "constant")
    res = _probe(model, signal_registry, internal="test.signal").run(model, _ctx(tmp_path))
    assert res.verdict == "constant" and res.metrics["std"] == 0.0
    assert res.metrics["intervention_passed"] == 1.0  # forcing it does change the output
    assert (res.metrics["force_low"], res.metrics["force_high"]) == (-0.5, 1.5)


def test_kssm_R_moves_the_output_and_delta_does_not(spec, registry, tmp_path):
    model = statelab.build(spec(), registry=registry)
    model.train()
    r = _probe(model, registry, internal="kssm.R", values=[0.1, 0.9]).run(model, _ctx(tmp_path))
    assert model.training  # left as found
    assert r.metrics["intervention_passed"] == 1.0 and r.metrics["intervention_p"] < 0.01
    assert r.metrics["n_sites"] == 2.0 and r.metrics["std"] > 0.01
    assert r.verdict == "causal"  # an untrained model: whether it also tracks the entropy is not asserted
    d = _probe(model, registry, internal="kssm.delta").run(model, _ctx(tmp_path))
    assert d.verdict == "epiphenomenal" and d.metrics["intervention_p"] == 1.0  # Delta is monitored, never used


def test_unknown_internal_is_a_clear_error(spec, registry, tmp_path):
    model = statelab.build(spec(), registry=registry)
    from kssm_oscillators.causality import CausalityProbe
    from kssm_oscillators.plugin import CausalityParams

    with pytest.raises(LookupError, match=r"publishes no internal 'kssm.X' \(it publishes: kssm.R, kssm.delta"):
        CausalityProbe(CausalityParams(internal="kssm.X", n_inputs=4, seq_len=8)).run(model, _ctx(tmp_path))
    with pytest.raises(statelab.SpecError, match="needs internal 'memory.recall'"):
        _probe(model, registry, internal="memory.recall")


def test_sign_flip_test_calibration():
    g = torch.Generator().manual_seed(0)
    # pure noise differences: p-values roughly uniform; a consistent shift: tiny p
    ps = [sign_flip_pvalue(torch.randn(20, 30, generator=g), 999, s)[0] for s in range(40)]
    assert 0.3 < sum(ps) / len(ps) < 0.7
    p_shift, _ = sign_flip_pvalue(torch.randn(20, 30, generator=g) + 0.5, 999, 0)
    assert p_shift == pytest.approx(1 / 1000)
    p_exact, _ = sign_flip_pvalue(torch.ones(5, 3), 100, 0)
    assert p_exact == pytest.approx(2 / 32)
