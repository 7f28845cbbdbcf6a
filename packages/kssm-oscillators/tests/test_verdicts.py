"""The `verdicts` probe and the random-phase null, on models where the answer is known by construction."""

import math

import pytest
import statelab
import torch
from statelab.interfaces import ProbeContext

from kssm_oscillators.rnull import compare_to_null, expected_r, sample_null_r
from kssm_oscillators.verdicts import FUNCTIONAL, NOT_FUNCTIONAL, ON_PATH, force_element, judge

AMP = 20.0  # forcing strong enough that the split integrator writes arg F into every phase in one token


def _copy_batches(n=4, B=8, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, 2, (B, T), generator=g) for _ in range(n)]
    return [(x, x.clone()) for x in xs]  # the answer is the current token


def r_carries_the_answer(spec, registry):
    """One Kuramoto layer, 16 oscillators, vocabulary {0, 1}, target = the current token.

    Token 0 forces every oscillator towards phase 0 (R ~ 1), token 1 towards evenly spread
    phases (R ~ 0; a phase at the antipode of its target lags one token); the readout reads only R of the whole population (harmonic 1): the
    hidden state is (R - 0.5) v, so the head's answer is R's side of 0.5."""
    bb = {"kind": "kssm", "n_layers": 1, "n_oscillators": 16, "group_levels": [1], "n_harmonics": 1,
          "readout_mult": 0, "coupling_init": 0.0, "freq_spread": 0.0, "integrator": "split"}
    model = statelab.build(spec(backbone=bb, d_model=4, vocab_size=2), registry=registry)
    layer, N = model.backbone.layers[0], 16
    phi = torch.arange(N) * 2 * math.pi / N
    v = torch.tensor([1.0, -1.0, 0.0, 0.0])
    with torch.no_grad():
        model.embed.weight.copy_(torch.stack([3 * v, -3 * v]))  # LayerNorm(embed) = +-sqrt(2) v
        w, b = layer.drive.weight, layer.drive.bias
        w[: 3 * N].zero_()
        b[: 3 * N].zero_()
        z = 1 / (2 * math.sqrt(2))  # LayerNorm(x)[0] = sqrt(2) z with z = +1 (token 0) or -1 (token 1)
        b[N : 2 * N], w[N : 2 * N, 0] = AMP * (1 + phi.cos()) / 2, AMP * (1 - phi.cos()) * z
        b[2 * N : 3 * N], w[2 * N : 3 * N, 0] = AMP * phi.sin() / 2, -AMP * phi.sin() * z
        layer.readout_lin.weight.zero_()
        layer.readout_lin.weight[:, 0] = 4 * v
        layer.readout_lin.bias.copy_(-2 * v)
    return model


def test_fixture_where_R_carries_the_answer_is_functional(spec, registry):
    model = r_carries_the_answer(spec, registry)
    batches = _copy_batches()
    with torch.no_grad():
        logits, _, aux = model(batches[0][0])
    R = aux["backbone.layers.0:kssm.R"][..., 0, 0]
    assert ((R > 0.8) == (batches[0][0] == 0)).all() and (R[batches[0][0] == 1] < 0.2).all()  # antipodal phases lag a token
    assert torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches[0][1].reshape(-1)) < 1e-3
    [site] = judge(model, batches, "kssm.R", (0, 0))
    assert site.on_path == ON_PATH and site.kl.low > 1.0
    assert site.functional == FUNCTIONAL
    assert site.delta_loss["mean"].low > 0.5  # R at its mean: chance (ln 2) instead of ~0
    assert site.versus_null["shuffle-rows"].verdict == "better"
    assert site.varies == "above null"  # R sits at 0 or 1, far from random phases' ~0.22


def test_untrained_model_is_on_the_path_but_not_functional(spec, registry):
    model = statelab.build(spec(), registry=registry)
    g = torch.Generator().manual_seed(1)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 24, (4, 6, 17), generator=g)]
    sites = judge(model, batches, "kssm.R", (0, 0))
    assert len(sites) == 2
    for s in sites:
        assert s.on_path == ON_PATH and s.kl.low > 1e-6, s.lines()  # small (logits near uniform), but not 0
        assert s.functional == NOT_FUNCTIONAL, s.lines()
        assert all(abs(iv.mean) < 0.005 for iv in s.delta_loss.values())


def test_forcing_one_element_leaves_the_others():
    v = torch.rand(2, 3, 5, 4)
    out = force_element((0, 0), lambda x: torch.full_like(x, 7.0))(v)
    assert (out[..., 0, 0] == 7).all()
    out[..., 0, 0] = v[..., 0, 0]
    assert torch.equal(out, v)


def test_random_phases_are_at_null_and_synchronised_ones_are_not():
    assert expected_r(64) == pytest.approx(0.1108, abs=1e-4)
    g = torch.Generator().manual_seed(3)
    r = sample_null_r(64, (6, 400), g)
    assert float(r.mean()) == pytest.approx(expected_r(64), rel=0.05)
    assert compare_to_null(r, 64, seed=9)["verdict"] == "at null"
    assert compare_to_null(r * 1.8, 64, seed=9)["verdict"] == "above null"
    assert compare_to_null(torch.full((6, 400), 0.3), 64)["verdict"] == "constant"
    # same mean as the null, much wider spread: varies
    wide = (torch.rand(6, 400, generator=g) * 2 * expected_r(64)).clamp(0, 1)
    assert compare_to_null(wide, 64)["verdict"] in ("varies", "at null")


def test_verdicts_probe_writes_its_report(spec, registry, tmp_path):
    model = statelab.build(spec(), registry=registry)
    probe = statelab.make_probe("verdicts", {"batches": 3, "batch_size": 4, "seq_len": 12,
                                             "internal": "backbone.layers.1:kssm.R"}, model, registry=registry)
    val = torch.randint(0, 24, (600,), generator=torch.Generator().manual_seed(0))
    res = probe.run(model, ProbeContext(val_tokens=val, out_dir=tmp_path, seed=0))
    assert res.metrics["on_path"] == 1.0 and res.metrics["functional"] == 0.0 and res.passed is False
    assert "backbone.layers.1.kl_low" in res.metrics
    assert "on the path" in res.verdict and "not functional" in res.verdict
    report = (tmp_path / "verdicts.md").read_text()
    assert "backbone.layers.1:kssm.R" in report and "backbone.layers.0" not in report  # only the site asked for


def test_group_level_and_psi_elements(spec, registry):
    from kssm_oscillators.rnull import group_size

    model = statelab.build(spec(), registry=registry)  # N = 16, group_levels [1, 4]
    layer = model.backbone.layers[0]
    assert [group_size(layer, i) for i in range(5)] == [16, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="out of range"):
        group_size(layer, 5)
    g = torch.Generator().manual_seed(2)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 24, (3, 4, 13), generator=g)]
    [r_group] = judge(model, batches, "backbone.layers.0:kssm.R", (2, 1), modes=("mean",))
    assert r_group.varies_detail["group_size"] == 4 and r_group.on_path == ON_PATH
    [psi] = judge(model, batches, "backbone.layers.1:kssm.psi", (0, 0), modes=("shuffle-rows",))
    assert psi.on_path == ON_PATH and psi.functional == NOT_FUNCTIONAL
    assert psi.varies == "varies" and psi.varies_detail["sd"] > 0.1 and "untrained_sd" in psi.varies_detail
