"""The injection critic (ranking injections, its ensemble spread), the novelty test, the state-conditioned
gate, edge rewards and reanalyse inside the planner."""

import pytest
import torch

from statelab.interfaces import PlanRequest

from crsm_planner.critic import InjectionCritic, Novelty
from crsm_planner.planner_testing import single_thread, trained_planner_model


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def trained():
    return trained_planner_model()


def _request(model, tokens):
    with torch.no_grad():
        logits, state, _ = model(tokens)
    return PlanRequest({k: v.clone() for k, v in state.items()}, logits[:, -1], 0, 7)


def test_critic_ensemble_ranks_moves_and_disagrees_away_from_its_data():
    g = torch.Generator().manual_seed(0)
    L, N = 4, 400
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    z, dz = torch.randn(N, L, generator=g), torch.randn(N, L, generator=g)
    delta = -(dz @ w) * (1 + 0.5 * z[:, 0].tanh()) + 0.05 * torch.randn(N, generator=g)  # a move along w helps
    critic = InjectionCritic(L, 32, members=3)
    with torch.enable_grad():
        critic.fit(z, dz, delta, steps=150, lr=2e-2, generator=g)
    zq = torch.randn(200, 1, L, generator=g).expand(200, 5, L)
    cand = torch.randn(200, 5, L, generator=g)  # five candidate moves per state
    gain, sd = critic.gain(zq, cand)
    truth = (cand @ w).argmax(1)
    assert (gain.argmax(1) == truth).float().mean() > 0.85
    _, sd_far = critic.gain(zq * 8, cand * 8)
    assert sd_far.mean() > 3 * sd.mean()


def test_novelty_trusts_the_fitting_states_and_not_states_far_from_them():
    g = torch.Generator().manual_seed(1)
    z, resid = torch.randn(1000, 3, generator=g), torch.rand(1000, generator=g)
    nov = Novelty(3)
    nov.calibrate(z, resid)
    assert (nov.trust(z, resid) == 1).float().mean() >= 0.98
    assert (nov.trust(z[:50] + 10, resid[:50]) == 0).all()  # far out in the latent
    assert (nov.trust(z[:50], resid[:50] + 10) == 0).all()  # outside the latent's span


def test_uncertainty_drops_alpha_to_zero_on_off_distribution_states(trained):
    model, _, tokens = trained
    pl = model.planner
    pl.gate.fill_(5.0)  # an open gate: only the planner's own doubt can hold the injection back
    req = _request(model, tokens[:256].view(8, 32))
    near = pl.plan(model, req)
    s = pl.codec.flatten(req.state)
    z0 = pl.codec.encode(s)
    resid = Novelty.residual(pl.codec.normalize(s), pl.codec.decode_normalized(z0))
    trust = pl.novelty.trust(z0, resid)  # text like the fitting text: familiar
    assert (trust > 0).all() and trust.mean() > 0.8
    far = {k: v * 25 if k in pl.codec.keys else v for k, v in req.state.items()}  # a state the backbone never had
    res = pl.plan(model, PlanRequest(far, req.logits, 0, 7))
    assert (res.alpha == 0).all() and (res.confidence == 0).all()
    assert near.alpha.shape == res.alpha.shape


def test_the_plan_injects_the_move_the_critic_ranks_first_and_nothing_it_expects_to_hurt(trained, monkeypatch):
    model, _, tokens = trained
    pl = model.planner
    pl.critic.fitted.fill_(1.0)
    req = _request(model, tokens[:96].view(3, 32))
    s = pl.codec.flatten(req.state)
    z0 = pl.codec.encode(s)
    # the critic prefers the root child whose latent move has the largest first coordinate, with certainty
    monkeypatch.setattr(pl.critic, "gain", lambda z, dz: (dz[..., 0] - dz[..., 0].min(-1, keepdim=True).values + 1,
                                                          torch.zeros_like(dz[..., 0])))
    res = pl.plan(model, req)
    move = pl.codec.flatten(res.target) - s
    search = pl.make_search(model).run(z0, req.logits)
    want = search.root_latents[torch.arange(3), (search.root_latents - z0[:, None])[..., 0].argmax(1)]
    torch.testing.assert_close(move, pl.codec.decode_delta(want, z0), rtol=1e-4, atol=1e-5)
    assert (res.confidence > 0).all()
    # every candidate predicted to raise the loss: no injection
    monkeypatch.setattr(pl.critic, "gain", lambda z, dz: (-torch.ones_like(dz[..., 0]), torch.zeros_like(dz[..., 0])))
    assert (pl.plan(model, req).alpha == 0).all()


def test_fit_trains_the_critic_on_realised_deltas_the_state_gate_and_reanalyse():
    model, m, _ = trained_planner_model(reanalyse_steps=20)
    pl = model.planner
    assert pl.critic.fitted.item() == m["critic/used"] and m["critic/samples"] >= 8 * 4 * 8
    assert (m["critic/used"] == 1.0) == (m["critic/heldout_skill"] > 0)
    for k in ("critic/heldout_corr", "critic/delta_of_critic_choice", "critic/delta_of_search_choice"):
        assert k in m
    assert pl.gate_weight.abs().sum() > 0  # the gate learned to depend on the state
    assert m["reanalyse/prior_visit_kl_after"] < m["reanalyse/prior_visit_kl_before"]


def test_task_rewards_on_edges_change_the_planned_token(trained):
    model, _, tokens = trained
    pl = model.planner
    pl.critic.fitted.fill_(0.0)  # the search's choice
    req = _request(model, tokens[:64].view(2, 32))
    first = pl.plan(model, req).info["best_token"]
    # a large reward for emitting some other root candidate than the one chosen
    search = pl.make_search(model).run(pl.codec.encode(pl.codec.flatten(req.state)), req.logits)
    other = [int(t[1]) if int(t[0]) == int(f) else int(t[0]) for t, f in zip(search.root_tokens, first)]
    pl.set_token_rewards({other[0]: 50.0})
    assert int(pl.plan(model, req).info["best_token"][0]) == other[0]
    pl.set_token_rewards(None)
    assert torch.equal(pl.plan(model, req).info["best_token"], first)
