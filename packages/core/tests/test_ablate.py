"""The ablate probe: a constant fed through is "no effect"; an internal carrying the answer is used."""

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import statelab
from statelab import ablate as ab
from statelab import stats
from statelab.data.base import Batch
from statelab.interfaces import Backbone, Layer
from statelab.internals import publish
from statelab.plugins import Component, Registry
from statelab.testing.toys import toy_spec

V = 16


class CarrierParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(1, description="number of layers (one is what the fixture is built for)")


class CarrierLayer(Layer):
    """``y = proj(x) + c``: publishes ``fixture.carry`` (input-dependent) and ``fixture.const``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d_model = d
        self.proj = nn.Linear(d, d, bias=False)
        self.const = nn.Parameter(0.5 * torch.randn(d))

    def forward(self, x, state=None):
        aux = {}
        carry = publish(aux, "fixture.carry", self.proj(x))  # (B, T, D)
        const = publish(aux, "fixture.const", self.const.expand_as(x))  # (B, T, D), the same everywhere
        return carry + const, {}, aux


class CarrierBackbone(Backbone):
    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.layers = nn.ModuleList([CarrierLayer(d)])


def _registry() -> Registry:
    import types

    mod = types.ModuleType("carrier_plugin")
    mod.STATELAB_PLUGIN_API = statelab.PLUGIN_API_VERSION
    mod.statelab_components = statelab.hookimpl(
        lambda: [Component("backbone", "carrier", CarrierParams, lambda p, c: CarrierBackbone(c.d_model),
                           publishes=["fixture.carry", "fixture.const"])]
    )
    reg = Registry()
    reg.register_plugin(mod, distribution="carrier", version="0")
    assert not reg.failures, reg.failures
    return reg


def _trained_model():
    spec = toy_spec(d_model=V, backbone={"kind": "carrier"}, tie_embeddings=False)
    model = statelab.build(spec, vocab_size=V, registry=_registry())
    with torch.no_grad():  # the "trained" solution of y = x + 1 (mod V), written by hand
        model.embed.weight.copy_(torch.eye(V))
        shift = torch.roll(torch.eye(V), 1, dims=0)  # e_i -> e_{i+1}
        model.backbone.layers[0].proj.weight.copy_(8.0 * shift)
        model.head.weight.copy_(torch.eye(V))
    return model


def _batches(n=6, B=8, T=12):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, T), generator=g)
        out.append(Batch(x, (x + 1) % V))
    return out


def test_constant_fed_through_is_no_effect_and_the_carrier_is_used():
    model = _trained_model()
    batches = _batches()
    const = ab.ablate(model, "fixture.const", batches)
    assert const.verdict == ab.NO_EFFECT
    for mode in ab.VERDICT_MODES:
        assert const.trained[mode].kl == 0.0 and const.trained[mode].delta_loss.mean == 0.0
    carry = ab.ablate(model, "fixture.carry", batches)
    assert carry.clean_loss < 0.05
    assert carry.verdict == ab.USED
    mean = carry.trained["mean"]
    assert mean.delta_loss.low > 2.0  # log 16 = 2.77 once the answer is gone
    assert carry.versus_null["mean"].verdict == stats.BETTER
    assert abs(carry.null["mean"].delta_loss.mean) < 0.05  # the untrained model barely uses it
    assert "used for prediction" in carry.table()
    m = carry.metrics()
    assert m["mean.delta_loss_low"] > 2.0 and "null.shuffle-rows.kl" in m


def test_on_the_path_but_not_used_in_an_untrained_model():
    # an untrained model depends on the carrier (output changes) but gains nothing from it
    model = statelab.build(toy_spec(d_model=V, backbone={"kind": "carrier"}, tie_embeddings=False),
                           vocab_size=V, registry=_registry())
    res = ab.ablate(model, "fixture.carry", _batches(), null_model=ab.untrained_like(model, seed=1))
    assert res.trained["mean"].kl > 1e-9
    assert res.verdict == ab.ON_PATH


def test_ablate_errors():
    model = _trained_model()
    with pytest.raises(LookupError, match="no component published 'nope'"):
        ab.ablate(model, "nope", _batches(1), null_model=None)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        ab.ablate(model, "fixture.carry", _batches(1), modes=["scramble"])


def test_the_ablate_probe_runs_on_validation_tokens(tmp_path):
    from statelab.interfaces import ProbeContext

    model = _trained_model()
    probe = statelab.make_probe("ablate", {"internal": "fixture.carry", "batches": 3, "batch_size": 4, "seq_len": 8,
                                           "modes": ["mean"]}, model, registry=_registry_with_core())
    tokens = torch.arange(200) % V  # every next token is the current one + 1: what the carrier predicts
    res = probe.run(model, ProbeContext(val_tokens=tokens, out_dir=tmp_path))
    assert res.metrics["mean.delta_loss"] > 0.5 and res.verdict == ab.USED
    assert "| mean |" in res.artifacts["table"].read_text()


def _registry_with_core() -> Registry:
    import statelab.builtin as core

    reg = _registry()
    reg.register_plugin(core, distribution="statelab-core", version="0")
    return reg
