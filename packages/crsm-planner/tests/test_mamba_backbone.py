"""The `mamba` backbone: conformance kit, paths against the naive reference, state
contract (fp32, chunked prefill with gradients), steering API, params validation, build
from a spec."""

import pytest
import torch
from pydantic import ValidationError

from statelab import build
from statelab.plugins import Registry
from statelab.testing import check_backbone, check_model
from statelab.testing.toys import toy_spec

import crsm_planner.plugin
from crsm_planner.backbone import MambaBackbone, build_mamba
from crsm_planner.mamba_params import MambaParams

D = 16
TINY = {
    "mamba1": dict(n_layers=2, mixer="mamba1", d_state=4),
    "mamba2": dict(n_layers=2, mixer="mamba2", d_state=4, headdim=8, ngroups=2, chunk_size=4),
}


def make(mixer, **kw):
    return MambaBackbone(D, MambaParams(**{**TINY[mixer], **kw}))


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_conformance_kit(mixer):
    check_backbone(lambda: make(mixer), d_model=D, T=14)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_torch_path_matches_naive_reference_with_initial_state(mixer):
    torch.manual_seed(0)
    bb = make(mixer).eval()
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        _, s0, _ = bb(x[:, :5])
        s0 = {k: v + 0.3 * torch.randn_like(v) for k, v in s0.items()}  # an arbitrary non-zero state
        y_fast, s_fast, _ = bb.set_impl("torch")(x[:, 5:], s0)
        y_ref, s_ref, _ = bb.set_impl("naive")(x[:, 5:], s0)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    for k in s_ref:
        torch.testing.assert_close(s_fast[k], s_ref[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_chunked_prefill_carries_gradients_like_the_whole_sequence(mixer):
    """Truncated BPTT without detaching: two chunks through the state == one forward, grads included."""
    torch.manual_seed(0)
    bb = make(mixer)
    x = torch.randn(2, 12, D)
    y_full, s_full, _ = bb(x)
    loss_full = y_full.pow(2).mean() + sum(v.pow(2).sum() for v in s_full.values())
    g_full = torch.autograd.grad(loss_full, list(bb.parameters()))
    y1, s1, _ = bb(x[:, :7])
    y2, s2, _ = bb(x[:, 7:], s1)
    loss_chunks = torch.cat([y1, y2], 1).pow(2).mean() + sum(v.pow(2).sum() for v in s2.values())
    g_chunks = torch.autograd.grad(loss_chunks, list(bb.parameters()))
    torch.testing.assert_close(loss_chunks, loss_full, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(bb.named_parameters(), g_chunks, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_state_shapes_and_fp32_under_autocast(mixer):
    bb = make(mixer)
    s = bb.init_state(3, "cpu", torch.bfloat16)
    if mixer == "mamba1":
        assert s["layers.0.ssm"].shape == (3, 2 * D, 4)
        assert s["layers.0.conv"].shape == (3, 3, 2 * D)
    else:
        assert s["layers.0.ssm"].shape == (3, 4, 8, 4)  # (B, nheads, headdim, d_state)
        assert s["layers.0.conv"].shape == (3, 3, 2 * D + 2 * 2 * 4)  # (B, d_conv-1, d_inner + 2 G N)
    x = torch.randn(3, 6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s, _ = bb(x)
        y_t, s2, _ = bb.step(x[:, 0], s)
    assert all(v.dtype == torch.float32 for v in list(s.values()) + list(s2.values()))
    assert torch.isfinite(y).all() and torch.isfinite(y_t).all()


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_bf16_weights_run_with_fp32_state_close_to_fp32(mixer):
    torch.manual_seed(0)
    bb = make(mixer).eval()
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        y32, s32, _ = bb(x)
        bb16 = bb.to(torch.bfloat16)
        y16, s16, _ = bb16(x.bfloat16())
        y_t, s_t, _ = bb16.step(x[:, 0].bfloat16(), s16)
    assert y16.dtype == torch.bfloat16 and y_t.dtype == torch.bfloat16  # the final norm returns the weight dtype
    assert all(v.dtype == torch.float32 for v in list(s16.values()) + list(s_t.values()))
    assert (y16.float() - y32).abs().max() < 0.1 * y32.abs().max()


def test_snapshot_restore_and_in_place_injection():
    torch.manual_seed(0)
    bb = make("mamba2").eval()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        _, s, _ = bb(x[:, :5])
        snap = bb.snapshot(s)
        y_ref, _, _ = bb.step(x[:, 5], s)
        target = {"layers.1.ssm": torch.randn_like(s["layers.1.ssm"])}
        before = s["layers.1.ssm"].clone()
        same = bb.inject_(s, target, torch.tensor([0.0, 1.0]))
        assert same is s
        assert torch.equal(s["layers.1.ssm"][0], before[0])  # a = 0: unchanged
        assert torch.equal(s["layers.1.ssm"][1], target["layers.1.ssm"][1])  # a = 1: the target
        assert torch.equal(snap["layers.1.ssm"], before)  # the snapshot did not move
        bb.inject_(s, target, 0.5)
        expected = 0.5 * target["layers.1.ssm"][0] + 0.5 * before[0]
        torch.testing.assert_close(s["layers.1.ssm"][0], expected)
        # out-of-place injection equals the in-place one
        s_new = bb.inject(bb.restore(snap), target, 0.25)
        s_inplace = bb.inject_(bb.restore(snap), target, 0.25)
        assert torch.equal(s_new["layers.1.ssm"], s_inplace["layers.1.ssm"])
        # restoring into the live tensors brings back the snapshot's continuation
        bb.restore(snap, into=s)
        y_again, _, _ = bb.step(x[:, 5], s)
        assert torch.equal(y_again, y_ref)
    with pytest.raises(KeyError, match="cannot inject into \\['layers.0.conv'\\]"):
        bb.inject_(s, {"layers.0.conv": s["layers.0.conv"]}, 0.5)
    assert bb.injectable_keys() == ["layers.0.ssm", "layers.1.ssm"]


def test_thousand_gated_injections_stay_bounded():
    torch.manual_seed(0)
    bb = make("mamba1").eval()
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        _, s, _ = bb(x)
        target = {k: torch.randn_like(s[k]) for k in bb.injectable_keys()}
        bound = max(max(s[k].abs().max(), target[k].abs().max()) for k in target)
        for _ in range(1000):
            bb.inject_(s, target, 0.3)
        assert all(s[k].abs().max() <= bound + 1e-6 for k in target)
        torch.testing.assert_close(s["layers.0.ssm"], target["layers.0.ssm"])  # converged to the target
        y, _, _ = bb.step(x[:, 0], s)
    assert torch.isfinite(y).all()


def test_params_validation_errors_say_what_to_do():
    with pytest.raises(ValueError, match="not divisible by headdim=64; set headdim to a divisor of 32"):
        MambaBackbone(D, MambaParams(mixer="mamba2"))
    with pytest.raises(ValueError, match="nheads = d_inner / headdim = 4 is not divisible by ngroups=3"):
        MambaBackbone(D, MambaParams(mixer="mamba2", headdim=8, ngroups=3))
    with pytest.raises(ValidationError, match="dt_min"):
        MambaParams(dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MambaParams(d_sate=16)
    for name, field in MambaParams.model_fields.items():
        assert field.description, f"MambaParams.{name} has no description"


def test_use_kernels_always_without_mamba_ssm_is_a_clear_error(monkeypatch):
    from crsm_planner import kernels

    monkeypatch.setattr(kernels, "_ops", lambda: None)
    with pytest.raises(RuntimeError, match="use_kernels='always' but mamba_ssm cannot be imported"):
        MambaBackbone(D, MambaParams(**TINY["mamba1"], use_kernels="always"))
    bb = MambaBackbone(D, MambaParams(**TINY["mamba1"], use_kernels="auto"))
    y, _, _ = bb(torch.randn(1, 3, D))  # auto on CPU: the pure-PyTorch path
    assert y.shape == (1, 3, D)


def _registry():
    reg = Registry(strict=True)
    reg.register_plugin(crsm_planner.plugin, distribution="crsm-planner", version="0")
    return reg


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_builds_from_a_spec_and_passes_the_model_checks(mixer):
    spec = toy_spec(backbone={"kind": "mamba", **TINY[mixer]})
    model = build(spec, registry=_registry())
    assert isinstance(model.backbone, MambaBackbone) and model.backbone.mixer_kind == mixer
    check_model(lambda: build(spec, registry=_registry()), T=10)


def test_factory_reads_d_model_from_the_build_context():
    class Ctx:
        d_model = 24

    bb = build_mamba(MambaParams(n_layers=1, mixer="mamba2", headdim=12), Ctx())
    assert bb.layers[0].mixer.nheads == 4 and bb.d_model == 24
