"""readout 'order' (only R reaches the output) and the straight-through clamp of u."""

import pytest
import statelab
import torch

from kssm_oscillators.bistability import bistable_terms

ORDER = {"kind": "kssm", "n_layers": 2, "n_oscillators": 16, "group_levels": [1, 4], "n_harmonics": 2,
         "readout_mult": 1, "readout": "order"}


def test_order_readout_reads_only_population_R(spec, registry):
    model = statelab.build(spec(backbone=ORDER), registry=registry)
    layer = model.backbone.layers[0]
    assert layer.read_groups.tolist() == [0] and layer.readout_lin.in_features == 2  # 1 group x 2 harmonics
    tok = torch.randint(0, 24, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, _, _ = model(tok)
        with statelab.intervene({"kssm.psi": 0.3}):  # phases never reach the output
            psi_forced, _, _ = model(tok)
        # group-level R (entries 1..4) does not either; the population's R does
        with statelab.intervene({"kssm.R": lambda r: torch.cat([r[:, :, :1], torch.zeros_like(r[:, :, 1:])], 2)}):
            groups_forced, _, _ = model(tok)
        with statelab.intervene({"kssm.R": lambda r: torch.cat([r[:, :, :1] * 0.5, r[:, :, 1:]], 2)}):
            pop_forced, _, _ = model(tok)
    torch.testing.assert_close(psi_forced, clean)
    torch.testing.assert_close(groups_forced, clean)
    assert (pop_forced - clean).abs().max() > 1e-4


def test_order_readout_with_group_levels(spec, registry):
    model = statelab.build(spec(backbone={**ORDER, "readout_levels": [1, 4]}), registry=registry)
    assert model.backbone.layers[1].read_groups.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(statelab.SpecError, match=r"readout_levels \[8\] are not among group_levels"):
        statelab.build(spec(backbone={**ORDER, "readout_levels": [8]}), registry=registry)


def _stuck_model(spec, registry, clamp_gradient):
    bb = {"kind": "kssm", "n_layers": 1, "n_oscillators": 16, "group_levels": [1, 4], "n_harmonics": 2,
          "clamp_gradient": clamp_gradient}
    model = statelab.build(spec(backbone=bb, regularizers=[{"kind": "bistability", "weight": 1.0}]), registry=registry)
    with torch.no_grad():  # d = 0.02: u_raw = d g / (a g) = 0.02, below the lower clamp everywhere
        model.backbone.layers[0].drive.bias[3 * 16 + 3] = 0.02
    return model


@pytest.mark.parametrize("clamp_gradient", ["straight-through", "hard"])
def test_barrier_moves_u_off_the_lower_clamp(spec, registry, clamp_gradient):
    torch.manual_seed(0)
    model = _stuck_model(spec, registry, clamp_gradient)
    tok = torch.randint(0, 24, (4, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def at_clamp():
        _, _, aux = model(tok)
        u = aux["backbone.layers.0:kssm.u"]
        return float((u <= 0.1 + 1e-6).float().mean()), aux

    assert at_clamp()[0] == 1.0
    for _ in range(30):  # the barrier alone
        opt.zero_grad()
        _, aux = at_clamp()
        model.regularization(aux)[0].backward()
        opt.step()
    frac, aux = at_clamp()
    if clamp_gradient == "hard":
        assert frac == 1.0  # the prototype's clamp: no gradient, u stays pinned
    else:
        assert frac == 0.0 and float(aux["backbone.layers.0:kssm.u"].detach().min()) > 0.1


def test_straight_through_keeps_the_clamped_value():
    p = torch.randn(256, 10, generator=torch.Generator().manual_seed(0)) * 3
    p.requires_grad_(True)
    u_st, u_raw, _ = bistable_terms(p)
    u_hard, _, _ = bistable_terms(p, clamp_gradient="hard")
    torch.testing.assert_close(u_st, u_hard)
    torch.testing.assert_close(u_st, u_raw.clamp(0.1, 10.0))
    # d(-u)/dp: descent raises u, so the gradient passes where u_raw is below the clamp or inside it
    g_st, = torch.autograd.grad(-u_st.sum(), p, retain_graph=True)
    g_raw, = torch.autograd.grad(-u_raw.sum(), p, retain_graph=True)
    up = (u_raw <= 10.0).unsqueeze(-1)
    torch.testing.assert_close(g_st, torch.where(up, g_raw, torch.zeros_like(g_raw)))
    g_down, = torch.autograd.grad(u_st.sum(), p)  # descent lowers u: passes only where u_raw >= 0.1
    torch.testing.assert_close(g_down, torch.where((u_raw >= 0.1).unsqueeze(-1), -g_raw, torch.zeros_like(g_raw)))
    assert (u_raw < 0.1).any() and (u_raw > 10).any()
