"""v3 bistability: u, Delta and their guards; the `bistability` regularizer."""

import math

import pytest
import statelab
import torch

from kssm_oscillators.bistability import BistabilityRegularizer, bistable_terms, guard_denominator, log_barrier


def _params(**vals):
    names = "abcdefghij"
    p = torch.zeros(10, dtype=torch.float64)
    for k, v in vals.items():
        p[names.index(k)] = v
    return p


def test_u_and_delta_follow_the_formulas():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1000, 10, generator=g, dtype=torch.float64) * 0.5
    u, u_raw, delta = bistable_terms(p, clamp=True, param_scale=1e9)  # scale huge: tanh bound is ~identity
    a, b, c, d, e, f, gg, h, _, _ = p.unbind(-1)
    den = a * gg - c * e
    ok = den.abs() > 1e-3
    torch.testing.assert_close(u_raw[ok], ((d * gg - c * h) / den)[ok])
    torch.testing.assert_close(delta, b * gg - c * f)
    torch.testing.assert_close(u, u_raw.clamp(0.1, 10.0))
    assert ((u_raw < 0.1) | (u_raw > 10)).float().mean() > 0.2  # the clamp is exercised
    assert (u >= 0.1).all() and (u <= 10.0).all()


def test_unclamped_u_is_the_raw_ratio():
    p = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    u, u_raw, _ = bistable_terms(p, clamp=False)
    torch.testing.assert_close(u, u_raw)
    assert u.min() < 0.1 and u.max() > 10  # the ablation really lets u leave [0.1, 10]


@pytest.mark.parametrize("clamp", [True, False])
def test_adversarial_parameters_stay_finite_with_finite_gradients(clamp):
    cases = torch.stack([
        _params(),  # everything zero: 0 / 0
        _params(d=1.0),  # x / 0
        _params(d=-3.0, g=1e-30, a=1e-30),  # vanishing denominator from below
        _params(a=1e30, g=1e30, c=1e30, e=1e30, d=1e30, h=-1e30),  # overflow-sized products
        _params(a=-1e38, b=3e38, c=-3e38, d=3e38, e=3e38, f=-3e38, g=3e38, h=3e38),
        _params(a=2.0, g=0.5, c=1.0, e=1.0),  # a g - c e = 0 exactly
    ]).float().requires_grad_(True)
    u, u_raw, delta = bistable_terms(cases, clamp=clamp)
    for t in (u, u_raw, delta):
        assert torch.isfinite(t).all()
    (u.sum() + delta.sum() + log_barrier(u, 1e-4).sum()).backward()
    assert torch.isfinite(cases.grad).all()
    if clamp:
        assert (u >= 0.1).all() and (u <= 10).all()


def test_denominator_guard_keeps_sign_and_size():
    den = torch.tensor([-1.0, -1e-6, 0.0, 1e-6, 2.0])
    torch.testing.assert_close(guard_denominator(den, 1e-3), torch.tensor([-1.0, -1e-3, 1e-3, 1e-3, 2.0]))


def test_regularizer_is_the_mean_log_barrier_over_sites():
    u0 = torch.tensor([[0.1, 1.0], [10.0, 2.0]])
    u1 = torch.tensor([[0.5, 0.5]])
    aux = {"backbone.layers.0:kssm.u": u0, "backbone.layers.1:kssm.u": u1,
           "backbone.layers.0:kssm.R": torch.tensor([0.2, 0.4]), "backbone.layers.0:kssm.delta": torch.tensor([-2.0, 1.0])}
    reg = BistabilityRegularizer(eps=1e-4)
    loss, m = reg(aux)
    expected = ((-torch.log(u0 + 1e-4)).mean() + (-torch.log(u1 + 1e-4)).mean()) / 2
    torch.testing.assert_close(loss, expected)
    assert m["u_min"].item() == pytest.approx(0.1) and m["u_max"].item() == pytest.approx(10.0)
    assert m["u_at_bound"].item() == pytest.approx(2 / 6)
    assert m["R_mean"].item() == pytest.approx(0.3) and m["R_std"].item() == pytest.approx(0.1)
    assert m["delta_abs_mean"].item() == pytest.approx(1.5)
    # the barrier pushes u up, and has no gradient beyond the clamp
    u = torch.tensor([0.5, 2.0], requires_grad=True)
    BistabilityRegularizer()({"kssm.u": u})[0].backward()
    assert (u.grad < 0).all()
    # the optional Delta barrier
    loss_d, _ = BistabilityRegularizer(eps=1e-4, delta_weight=0.5)(aux)
    torch.testing.assert_close(loss_d, expected + 0.5 * (-torch.log(torch.tensor([2.0, 1.0]) + 1e-4)).mean())


def test_regularizer_on_negative_u_is_finite():
    loss, _ = BistabilityRegularizer()({"kssm.u": torch.tensor([-5.0, 0.0, 1.0])})
    assert torch.isfinite(loss) and loss.item() == pytest.approx((-math.log(1e-4) * 2 - math.log(1 + 1e-4)) / 3)


def test_regularizer_needs_kssm_u(registry, spec):
    doc = spec(backbone={"kind": "toy-rnn", "n_layers": 1}, regularizers=[{"kind": "bistability", "weight": 0.1}])
    with pytest.raises(statelab.SpecError, match="needs internal 'kssm.u'"):
        statelab.validate_spec(doc, registry)
    with pytest.raises(KeyError, match="needs the 'kssm' backbone"):
        BistabilityRegularizer()({"toy.gate": torch.ones(2)})


def test_regularizer_in_a_model_and_its_gradient_reaches_the_ten_parameters(registry, spec):
    model = statelab.build(spec(regularizers=[{"kind": "bistability", "weight": 0.3}]), registry=registry)
    tok = torch.randint(0, 24, (2, 8), generator=torch.Generator().manual_seed(0))
    _, _, aux = model(tok)
    total, metrics = model.regularization(aux)
    us = [v for k, v in aux.items() if k.endswith(":kssm.u")]
    assert len(us) == 2 and us[0].shape == (2, 8)
    torch.testing.assert_close(total, 0.3 * torch.stack([(-torch.log(u + 1e-4)).mean() for u in us]).mean())
    assert {"reg/0.bistability", "reg/0.bistability.u_mean", "reg/0.bistability.R_mean"} <= set(metrics)
    total.backward()
    w = model.backbone.layers[0].drive.weight
    assert w.grad[-10:].abs().sum() > 0  # the rows producing [a..j]


def test_regularizer_logs_population_R_and_its_random_phase_level(registry, spec):
    from kssm_oscillators.rnull import expected_r

    model = statelab.build(spec(regularizers=[{"kind": "bistability", "weight": 0.1}]), registry=registry)
    _, _, aux = model(torch.randint(0, 24, (2, 8), generator=torch.Generator().manual_seed(0)))
    _, m = model.regularization(aux)
    pop = torch.stack([v[..., 0, 0].mean() for k, v in aux.items() if k.endswith("kssm.R")]).mean()
    assert m["reg/0.bistability.R_global_mean"].item() == pytest.approx(pop.item())
    assert m["reg/0.bistability.R_global_null"].item() == pytest.approx(expected_r(16))  # the tiny spec's N
