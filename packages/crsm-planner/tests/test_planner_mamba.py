"""The planner on the mamba backbone (steers the SSM states), and model conformance with a planner."""

import pytest
import torch

import statelab
from statelab.interfaces import PlanRequest
from statelab.testing.conformance import check_model

from crsm_planner.planner_testing import mode_switch_tokens, planner_model, single_thread, window_batches

MAMBA = {"kind": "mamba", "n_layers": 2, "d_state": 8, "headdim": 16, "chunk_size": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_models_with_the_planner_pass_the_conformance_kit():
    check_model(lambda: planner_model())
    check_model(lambda: planner_model(backbone=MAMBA), atol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_planner_fits_and_steers_a_mamba_backbone(mixer):
    mamba1 = {k: v for k, v in MAMBA.items() if k not in ("headdim", "chunk_size")}  # mamba2-only fields
    model = planner_model(backbone={**MAMBA, "mixer": "mamba2"} if mixer == "mamba2" else {**mamba1, "mixer": "mamba1"},
                          simulations=8, d_latent=8, gate_steps=2,
                          asynchronous=False, plan_every=2)
    keys = [f"backbone.{k}" for k in model.backbone.injectable_keys()]
    assert keys and all(k.endswith(".ssm") for k in keys)
    tokens = mode_switch_tokens(3000)
    m = model.planner.fit(model, window_batches(tokens, 4, 16), steps=6, lr=3e-3)
    assert all(v == v for v in m.values())  # finite metrics, no NaN
    assert m["dyn/one_step_copy_mse"] > 0
    with torch.no_grad():
        logits, state, _ = model(tokens[:32].view(2, 16))
    res = model.planner.plan(model, PlanRequest(state, logits[:, -1], 15, 1))
    assert set(res.target) == set(keys)
    for k in keys:
        assert res.target[k].shape == state[k].shape and res.target[k].dtype == state[k].dtype
    out = statelab.generate(model, tokens[:16].view(2, 8), max_new_tokens=12, seed=0)
    assert out.stats["planner.applied"] >= 4
    assert all(torch.isfinite(v).all() for v in out.state.values())


def test_fitted_planner_round_trips_through_a_checkpoint(tmp_path):
    from statelab import checkpoint

    model = planner_model(backbone=MAMBA, simulations=4, d_latent=8, gate_steps=0)
    checkpoint.save(tmp_path / "unfitted", model)
    assert statelab.load(tmp_path / "unfitted").planner.fitted.item() == 0.0
    tokens = mode_switch_tokens(2000)
    model.planner.fit(model, window_batches(tokens, 2, 16), steps=2)
    checkpoint.save(tmp_path / "fitted", model)
    loaded = statelab.load(tmp_path / "fitted")
    assert loaded.planner.fitted.item() == 1.0
    with torch.no_grad():
        logits, state, _ = model(tokens[:16].view(1, 16))
    a = model.planner.plan(model, PlanRequest(state, logits[:, -1], 0, 1))
    b = loaded.planner.plan(loaded, PlanRequest(state, logits[:, -1], 0, 1))
    assert all(torch.equal(a.target[k], b.target[k]) for k in a.target)
