"""The `mcts` planner: building, fitting (dynamics, value, prior), planning, gating, loading."""

import pytest
import torch

import statelab
from statelab.interfaces import PlanRequest
from statelab.spec import SpecError

from crsm_planner.planner import MCTSPlanner
from crsm_planner.planner_params import MCTSParams
from crsm_planner.planner_testing import mode_switch_tokens, planner_model, trained_planner_model, window_batches


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a thread pool only adds overhead on a loaded 2-core runner
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained():
    return trained_planner_model()


def _request(model, tokens, step=0, gid=7):
    with torch.no_grad():
        logits, state, _ = model(tokens)
    return PlanRequest({k: v.clone() for k, v in state.items()}, logits[:, -1], step, gid)


def test_registered_planner_builds_and_needs_a_steerable_backbone():
    model = planner_model()
    assert isinstance(model.planner, MCTSPlanner)
    assert not any(p.requires_grad for p in model.planner.parameters())  # backbone training leaves it alone
    with pytest.raises(SpecError, match="injectable_state"):
        planner_model(backbone={"kind": "toy-mlp", "n_layers": 1})


def test_params_are_validated_with_a_clear_message():
    with pytest.raises(ValueError, match="max_nodes=8 cannot hold the root and its 8 children"):
        MCTSParams(max_nodes=8, top_k=8)
    with pytest.raises(ValueError, match="extra"):
        MCTSParams(simulation=3)


def test_unfitted_planner_proposes_but_never_injects():
    model = planner_model(simulations=8)
    req = _request(model, torch.randint(0, 256, (3, 10)))
    res = model.planner.plan(model, req)
    keys = {f"backbone.layers.{i}.h" for i in range(2)}
    assert set(res.target) == keys
    for k in keys:
        assert res.target[k].shape == req.state[k].shape and torch.isfinite(res.target[k]).all()
    assert res.alpha.shape == (3,) and torch.equal(res.alpha, torch.zeros(3))
    assert (res.step, res.generation_id) == (0, 7)


def test_fit_beats_trivial_predictors_on_heldout_rollouts(trained):
    _, m, _ = trained
    # dynamics: one-step and k-step errors well below "the state does not change"
    assert m["dyn/one_step_mse"] < 0.5 * m["dyn/one_step_copy_mse"]
    assert m["dyn/k_step_mse"] < 0.5 * m["dyn/k_step_copy_mse"]
    assert m["dyn/k"] == 4
    # value head: tracks the realised loss of the next k tokens on a batch it never trained on
    assert m["value/corr"] > 0.5
    assert m["value/mse"] < 0.8 * m["value/const_mse"]
    # prior head: mostly agrees with the LM's top token
    assert m["prior/top1_agree"] > 0.5
    assert m["fit/loss_last"] < m["fit/loss_first"]
    assert 0 < m["gate/sigmoid"] < 1 and "gate/loss_delta" in m


def test_fit_refuses_too_short_sequences():
    model = planner_model(value_horizon=8)
    with pytest.raises(ValueError, match="at least 10 tokens .* raise train.planner_fit.seq_len"):
        model.planner.fit(model, window_batches(mode_switch_tokens(500), 2, 6), steps=2)


def test_plan_is_deterministic_and_alpha_follows_the_gate_formula(trained):
    model, _, tokens = trained
    req = _request(model, tokens[:64].view(2, 32))
    a = model.planner.plan(model, req)
    b = model.planner.plan(model, req)
    assert all(torch.equal(a.target[k], b.target[k]) for k in a.target)
    assert torch.equal(a.alpha, b.alpha)
    p, pl = model.planner.params, model.planner
    z = pl.codec.encode(pl.codec.flatten(req.state))
    zhat = (z - pl.novelty.z_mean) / pl.novelty.z_var.sqrt()
    expected = p.alpha_max * torch.sigmoid(pl.gate + zhat @ pl.gate_weight) * a.confidence
    torch.testing.assert_close(a.alpha, expected)
    assert ((0 <= a.confidence) & (a.confidence <= 1)).all()
    assert (a.alpha <= p.alpha_max).all()


def test_flat_value_head_gives_alpha_zero(trained):
    model, _, tokens = trained
    model.planner.critic.fitted.fill_(0.0)  # the search's own choice and confidence
    with torch.no_grad():  # a value head that says the same thing everywhere: nothing to prefer
        model.planner.value_head.net[-1].weight.zero_()
    res = model.planner.plan(model, _request(model, tokens[:64].view(2, 32)))
    # equal leaf values leave only float rounding in the backed-up means (sums of n equal values
    # divided by n): a gap of ~1e-7 relative, so alpha is 0 up to ~1e-6 depending on the trained model
    assert res.alpha.abs().max().item() < 1e-5


def test_uncertain_value_head_gives_alpha_near_zero(trained):
    model, _, tokens = trained
    model.planner.critic.fitted.fill_(0.0)  # the search's own choice and confidence
    req = _request(model, tokens[:96].view(3, 32))
    sure = model.planner.plan(model, req)
    with torch.no_grad():  # same mean predictions, enormous predicted variance
        model.planner.value_head.net[-1].bias[1] += 30.0
    unsure = model.planner.plan(model, req)
    assert (unsure.alpha <= sure.alpha + 1e-9).all()
    assert unsure.alpha.max().item() < 1e-4


def test_fitted_planner_survives_a_state_dict_round_trip(trained):
    model, _, tokens = trained
    fresh = planner_model(simulations=16, d_latent=16, gate_steps=10, seed=123)
    assert fresh.planner.codec.state_dim == 0  # shaped lazily
    fresh.load_state_dict(model.state_dict(), strict=True)
    req = _request(model, tokens[:64].view(2, 32))
    a, b = model.planner.plan(model, req), fresh.planner.plan(fresh, req)
    assert all(torch.equal(a.target[k], b.target[k]) for k in a.target)
    assert torch.equal(a.alpha, b.alpha) and fresh.planner.fitted.item() == 1.0


def test_planner_refuses_a_backbone_of_another_shape(trained):
    model, _, _ = trained
    other = planner_model(backbone={"kind": "toy-rnn", "n_layers": 3, "d_state": 16})
    st = other.init_state(1)
    with pytest.raises(ValueError, match="fitted on states of 32 features, but the backbone's injectable state has 48"):
        model.planner.ensure_ready(other, st)


def test_target_is_the_snapshot_moved_by_the_decoded_latent_change(trained):
    model, _, tokens = trained
    pl = model.planner
    req = _request(model, tokens[:64].view(2, 32))
    res = pl.plan(model, req)
    s = pl.codec.flatten(req.state)
    z0 = pl.codec.encode(s)
    t = pl.codec.flatten(res.target)
    # the change lies in the decoder's column space (scaled per feature by the std)
    delta = (t - s) / pl.codec.std
    coef = torch.linalg.lstsq(pl.codec.dec_weight, delta.T).solution  # (L, B)
    torch.testing.assert_close(pl.codec.dec_weight @ coef, delta.T, atol=1e-4, rtol=1e-3)
    assert z0.shape == (2, 16)


def test_statelab_generate_runs_the_planner_hook(trained):
    model, _, tokens = trained
    model.planner.params = model.planner.params.model_copy(update={"asynchronous": False, "plan_every": 2})
    res = statelab.generate(model, tokens[:40].view(2, 20), max_new_tokens=30, seed=0)
    st = res.stats
    assert st["planner.requested"] >= 14 and st["planner.applied"] >= 13
    assert st["planner.mean_lag"] == 1.0


def test_cpu_shadow_plans_like_the_planner_and_is_refreshed_after_a_fit(trained):
    model, _, tokens = trained
    pl = model.planner
    shadow = pl.shadow_for(model, "cpu")
    assert shadow is not pl and shadow.lm_head is not None
    assert pl.shadow_for(model, "cpu") is shadow  # cached while the weights are unchanged
    req = _request(model, tokens[:64].view(2, 32))
    a, b = pl.plan(model, req), shadow.plan(model, req)
    assert all(torch.equal(a.target[k], b.target[k]) for k in a.target) and torch.equal(a.alpha, b.alpha)
    pl.fit(model, window_batches(tokens, 2, 16), steps=1)
    assert pl.shadow_for(model, "cpu") is not shadow


def test_cap_target_norm_bounds_each_head_and_keeps_short_targets():
    from crsm_planner.planner import cap_target_norm

    g = torch.Generator().manual_seed(0)
    h = {"a": torch.randn(2, 3, 4, 5, generator=g), "b": torch.randn(2, 6, 5, generator=g), "c": torch.randn(2, 7, generator=g)}
    long = {k: 5.0 * torch.randn(v.shape, generator=g) for k, v in h.items()}
    short = {k: 0.1 * v for k, v in h.items()}
    capped = cap_target_norm(long, h)
    for k, v in h.items():
        dims = tuple(range(max(1, v.dim() - 2), v.dim()))  # per head (B, H, P, N); per layer (B, Di, N); per row (B, d)
        hn = torch.linalg.vector_norm(v, dim=dims)
        torch.testing.assert_close(torch.linalg.vector_norm(capped[k], dim=dims), hn)  # long targets: cut to |h|
        ratio = capped[k] / long[k]  # one positive scale per unit: the direction is kept
        assert (ratio > 0).all() and (ratio.amax(dims) - ratio.amin(dims)).abs().max() < 1e-5
        for a in (0.3, 0.5, 1.0):
            mixed = torch.lerp(v, capped[k], a)
            assert (torch.linalg.vector_norm(mixed, dim=dims) <= hn * (1 + 1e-6)).all()
        torch.testing.assert_close(cap_target_norm(short, h)[k], short[k])  # within the bound: untouched
    # per head, not per layer: a head with a tiny state gets a tiny target even if others are large
    h4 = torch.ones(1, 2, 2, 2)
    h4[:, 1] *= 1e-3
    t4 = cap_target_norm({"k": torch.full((1, 2, 2, 2), 10.0)}, {"k": h4})["k"]
    torch.testing.assert_close(torch.linalg.vector_norm(t4[0, 1]), torch.linalg.vector_norm(h4[0, 1]))


def test_value_head_without_heldout_skill_never_injects():
    """On uniformly random bytes the future loss cannot be read from the state: the fitted
    value head does no better than a constant on held-out text, its skill is 0 and so is
    every alpha. On the mode-switch text (where it can) the skill is positive."""
    model = planner_model(simulations=8, d_latent=8, gate_steps=2)
    noise = torch.randint(0, 256, (6000,), generator=torch.Generator().manual_seed(0))
    m = model.planner.fit(model, window_batches(noise, 8, 24), steps=10, lr=3e-3)
    assert m["value/mse"] >= m["value/const_mse"] * 0.98
    assert m["value/skill"] == pytest.approx(max(0.0, 1 - m["value/mse"] / m["value/const_mse"]), abs=1e-6)
    assert model.planner.value_skill.item() < 0.02
    with torch.no_grad():
        logits, state, _ = model(noise[:64].view(2, 32))
    res = model.planner.plan(model, PlanRequest(state, logits[:, -1], 31, 1))
    assert res.alpha.abs().max().item() <= 0.02 * model.planner.params.alpha_max
    _, metrics, _ = trained_planner_model()
    assert metrics["value/skill"] > 0.05


def test_backbone_world_model_searches_with_the_true_step(trained):
    """world_model: backbone: the chosen move is exactly the backbone's own state change on
    reading the chosen token (no latent model in between), and the generation hook sends the
    whole state it needs."""
    model, _, tokens = trained
    pl = model.planner
    pl.params = pl.params.model_copy(update={"world_model": "backbone", "simulations": 8})
    pl.critic.fitted.fill_(0.0)  # the search's own choice
    req = _request(model, tokens[:64].view(2, 32))
    res = pl.plan(model, req)
    with torch.no_grad():
        _, after, _ = model.step(res.info["best_token"], req.state)
    for k in pl.codec.keys:
        torch.testing.assert_close(res.target[k], after[k])
    pl.params = pl.params.model_copy(update={"asynchronous": False, "plan_every": 3})
    st = statelab.generate(model, tokens[:40].view(2, 20), max_new_tokens=12, seed=0).stats
    assert st["planner.applied"] >= 3
    with pytest.raises(ValueError, match="use device: auto"):
        MCTSParams(world_model="backbone", device="cpu")
