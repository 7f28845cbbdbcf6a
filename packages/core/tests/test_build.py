"""Assembly: memories at different layers, state layout, internals and interventions."""

from __future__ import annotations

import pytest
import torch

import statelab
from statelab.build import describe
from statelab.interfaces import gated_inject
from statelab.internals import intervene, publish, select, site
from statelab.testing import check_model
from statelab.testing.toys import ToyEMAMemory, toy_registry, toy_spec


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


def test_memories_run_after_their_layers(reg, monkeypatch):
    spec = toy_spec(
        backbone={"kind": "toy-rnn", "n_layers": 3, "d_state": 8},
        memories=[{"kind": "toy-ema", "after_layer": 2}, {"kind": "toy-ema", "after_layer": 0}],
    )
    model = statelab.build(spec, registry=reg)
    order: list[str] = []
    for i, layer in enumerate(model.backbone.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: order.append(f"layer{i}"))
    for j, mem in enumerate(model.memories):
        mem.register_forward_hook(lambda m, a, o, j=j: order.append(f"memory{j}"))
    _, state, aux = model(torch.randint(0, 256, (2, 5)))
    assert order == ["layer0", "memory1", "layer1", "layer2", "memory0"]
    assert sorted(state) == ["backbone.layers.0.h", "backbone.layers.1.h", "backbone.layers.2.h", "memory.0.m", "memory.1.m"]
    assert {k for k in aux if k.endswith("memory.recall")} == {"memory.0:memory.recall", "memory.1:memory.recall"}
    assert sorted(select(aux, "toy.gate")) == [f"backbone.layers.{i}:toy.gate" for i in range(3)]


def test_memory_after_layer_changes_the_output_and_keeps_state_separate(reg):
    base = statelab.build(toy_spec(), registry=reg)
    withmem = statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}]), registry=reg)
    tok = torch.randint(0, 256, (2, 6))
    # same seed, same backbone parameters; the memory changes the stream
    assert torch.equal(base.backbone.layers[0].w_in.weight, withmem.backbone.layers[0].w_in.weight)
    assert not torch.allclose(base(tok)[0], withmem(tok)[0])


def test_build_is_deterministic_under_the_spec_seed(reg):
    a = statelab.build(toy_spec(), registry=reg)
    b = statelab.build(toy_spec(), registry=reg)
    c = statelab.build({**toy_spec(), "seed": 7}, registry=reg)
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_tied_and_untied_heads(reg):
    tied = statelab.build(toy_spec(), registry=reg)
    untied = statelab.build(toy_spec(tie_embeddings=False), registry=reg)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() == tied.num_parameters() + 256 * 16


def test_assembled_models_pass_the_conformance_kit(reg):
    check_model(lambda: statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 1}]), registry=reg))
    check_model(lambda: statelab.build(toy_spec(backbone={"kind": "toy-mlp", "n_layers": 2}), registry=reg))


def test_vocab_size_rules(reg):
    doc = toy_spec()
    doc["tokenizer"] = {"kind": "char"}
    with pytest.raises(statelab.SpecError, match="model.vocab_size: the vocabulary size of a 'char' tokenizer"):
        statelab.build(doc, registry=reg)
    assert statelab.build(doc, registry=reg, vocab_size=65).vocab_size == 65
    doc["model"]["vocab_size"] = 100
    assert statelab.build(doc, registry=reg).vocab_size == 100


def test_describe_lists_parameters_and_internals(reg):
    text = describe(statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}]), registry=reg))
    assert "parameters: " in text
    assert "internals: memory.gate (model.memories.0), memory.recall (model.memories.0), toy.gate (model.backbone)" in text


def test_factory_returning_the_wrong_type_is_named(reg):
    from statelab.plugins import Component, Registry
    from statelab.testing.toys import ToyRNNParams

    bad = Registry()
    bad._add(Component("backbone", "liar", ToyRNNParams, lambda p, c: ToyEMAMemory(c.d_model), "returns a memory"))
    with pytest.raises(TypeError, match=r"model.backbone: factory of backbone 'liar' \(<local>\) returned ToyEMAMemory, not a Backbone"):
        statelab.build(toy_spec(backbone={"kind": "liar"}), registry=bad)


# --- internals and interventions ------------------------------------------------------


def test_intervention_forces_an_internal_and_changes_the_output(reg):
    model = statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}]), registry=reg).eval()
    tok = torch.randint(0, 256, (2, 7))
    ref, _, aux = model(tok)
    with intervene({"memory.recall": 0.0}) as forced:
        zeroed, _, aux0 = model(tok)
    assert forced == {"memory.0:memory.recall"}
    assert torch.count_nonzero(aux0["memory.0:memory.recall"]) == 0
    assert not torch.allclose(zeroed, ref)
    # forcing the recall to its own value (a function of the original) is a no-op
    with intervene({"memory.0:memory.recall": lambda r: r.clone()}):
        same, _, _ = model(tok)
    torch.testing.assert_close(same, ref)
    # the gate at one site only
    with intervene({"backbone.layers.1:toy.gate": 1.0}):
        _, _, aux1 = model(tok)
    assert torch.all(aux1["backbone.layers.1:toy.gate"] == 1.0)
    assert not torch.all(aux1["backbone.layers.0:toy.gate"] == 1.0)


def test_intervention_also_applies_while_stepping(reg):
    model = statelab.build(toy_spec(), registry=reg).eval()
    tok = torch.randint(0, 256, (2,))
    ref, _, _ = model.step(tok)
    with intervene({"toy.gate": 0.0}):
        forced, _, aux = model.step(tok)
    assert all(torch.all(v == 0) for v in select(aux, "toy.gate").values())
    assert not torch.allclose(forced, ref)


def test_intervention_on_an_unpublished_name_is_an_error(reg):
    model = statelab.build(toy_spec(), registry=reg)
    with pytest.raises(LookupError, match=r"intervene: no component published \['kssm.R'\] inside the block"):
        with intervene({"kssm.R": 0.5}):
            model(torch.randint(0, 256, (1, 3)))


def test_publish_outside_a_model_uses_bare_names_and_sites_nest():
    aux: dict = {}
    x = torch.ones(2)
    assert publish(aux, "a.b", x) is x
    with site("outer"), site("inner"):
        publish(aux, "c", x)
    assert sorted(aux) == ["a.b", "outer.inner:c"]


def test_regularization_is_weighted_and_logged_per_regularizer(reg):
    spec = toy_spec(regularizers=[{"kind": "toy-gate-l2", "weight": 0.5, "target": 0.0}, {"kind": "toy-gate-l2", "weight": 2.0, "target": 1.0}])
    model = statelab.build(spec, registry=reg)
    _, _, aux = model(torch.randint(0, 256, (2, 4)))
    total, metrics = model.regularization(aux)
    gates = torch.cat([g.flatten() for g in select(aux, "toy.gate").values()])
    l0 = torch.stack([g.pow(2).mean() for g in select(aux, "toy.gate").values()]).mean()
    l1 = torch.stack([(g - 1).pow(2).mean() for g in select(aux, "toy.gate").values()]).mean()
    torch.testing.assert_close(total, 0.5 * l0 + 2.0 * l1)
    assert set(metrics) == {"reg/0.toy-gate-l2", "reg/0.toy-gate-l2.gate_mean", "reg/1.toy-gate-l2", "reg/1.toy-gate-l2.gate_mean"}
    assert gates.numel() > 0
    total.backward()
    assert model.backbone.layers[0].w_gate.weight.grad is not None


def test_gated_injection_is_a_convex_interpolation():
    s = {"h": torch.zeros(2, 3), "other": torch.ones(2)}
    t = {"h": torch.ones(2, 3)}
    out = gated_inject(s, t, torch.tensor([0.25, 2.0]))  # alpha is clamped to [0, 1]
    torch.testing.assert_close(out["h"], torch.tensor([[0.25] * 3, [1.0] * 3]))
    assert out["other"] is s["other"] and torch.all(s["h"] == 0)  # the input is not modified
    # 1000 consecutive injections toward bounded targets stay bounded
    g = torch.Generator().manual_seed(0)
    state = {"h": torch.randn(4, 8, generator=g)}
    for _ in range(1000):
        state = gated_inject(state, {"h": torch.randn(4, 8, generator=g).clamp(-3, 3)}, 0.3)
    assert state["h"].abs().max() <= 3.0 + 1e-5


def test_backbone_inject_refuses_unknown_keys(reg):
    model = statelab.build(toy_spec(), registry=reg)
    state = model.backbone.init_state(2)
    with pytest.raises(KeyError, match="cannot inject into"):
        model.backbone.inject(state, {"layers.0.nope": torch.zeros(2, 8)}, 0.5)
