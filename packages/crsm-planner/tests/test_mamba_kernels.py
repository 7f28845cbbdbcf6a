"""The mamba-ssm kernel path's wrappers, on CPU, with the kernels replaced by pure-PyTorch
stand-ins that follow mamba-ssm's documented calling conventions (layouts, zero initial
state of ``selective_scan_fn`` and its gradient-free last state, in-place
``selective_state_update``). This checks our side: layouts, the Mamba-1 linearity
correction for a non-zero initial state, and state handling. The real kernels are
compared on a GPU by benchmarks/crsm/gpu_parity.py."""

import pytest
import torch

from crsm_planner import kernels
from crsm_planner.backbone import MambaBackbone
from crsm_planner.mamba_params import MambaParams
from crsm_planner.naive import selective_scan_naive, ssd_naive

D = 16


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """u, delta (b, d, l); B, C (b, n, l); starts from h = 0; last state without gradient."""
    assert z is None and delta_bias is None and not delta_softplus
    y, h = selective_scan_naive(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D)
    out = y.transpose(1, 2)  # (b, d, l)
    return (out, h.detach()) if return_last_state else out


def fake_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """state (b, d, n) or (b, h, p, n), updated in place; returns out like x."""
    assert z is None and not dt_softplus
    assert dt_bias is None or not dt_bias.any()  # we pass a zero bias: mamba-ssm reads its strides
    if state.dim() == 3:
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, d, n)
        dBx = (dt * x).unsqueeze(-1) * B.unsqueeze(1)
        Cx = C.unsqueeze(1)
    else:
        rep = state.shape[1] // B.shape[1]
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, h, p, n)
        dBx = (dt * x).unsqueeze(-1) * B.repeat_interleave(rep, 1).unsqueeze(2)
        Cx = C.repeat_interleave(rep, 1).unsqueeze(2)
    state.copy_(state * dA + dBx)
    out = (state * Cx).sum(-1)
    return out + x * D if D is not None else out


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                   dt_softplus=False, return_final_states=False):
    assert z is None and dt_bias is None and not dt_softplus
    y, h = ssd_naive(x, dt, A, B, C, D, initial_states)
    return (y, h) if return_final_states else y


@pytest.fixture
def fake_kernels(monkeypatch):
    ops = {"selective_scan_fn": fake_selective_scan_fn, "selective_state_update": fake_selective_state_update,
           "mamba_chunk_scan_combined": fake_mamba_chunk_scan_combined}
    monkeypatch.setattr(kernels, "_ops", lambda: ops)


def test_mamba1_linearity_correction_matches_the_reference_from_a_nonzero_state(fake_kernels):
    g = torch.Generator().manual_seed(0)
    Bt, T, Di, N = 2, 9, 5, 3
    u, B_, C_ = torch.randn(Bt, T, Di, generator=g), torch.randn(Bt, T, N, generator=g), torch.randn(Bt, T, N, generator=g)
    dt = torch.rand(Bt, T, Di, generator=g) * 0.5
    A, Dp, h0 = -torch.rand(Di, N, generator=g) * 2, torch.randn(Di, generator=g), torch.randn(Bt, Di, N, generator=g)
    with torch.no_grad():
        y, h = kernels.mamba1_scan(u, dt, A, B_, C_, Dp, h0)
        y0, h0_out = kernels.mamba1_scan(u, dt, A, B_, C_, Dp, None)
    y_ref, h_ref = selective_scan_naive(u, dt, A, B_, C_, Dp, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    y_ref0, h_ref0 = selective_scan_naive(u, dt, A, B_, C_, Dp, None)
    torch.testing.assert_close(y0, y_ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h0_out, h_ref0, atol=1e-5, rtol=1e-5)
    # with gradients on, the final state is differentiable even though the kernel's is not
    u.requires_grad_()
    _, h = kernels.mamba1_scan(u, dt, A, B_, C_, Dp, h0)
    (gu,) = torch.autograd.grad(h.sum(), u)
    u_ref = u.detach().requires_grad_()
    (gu_ref,) = torch.autograd.grad(selective_scan_naive(u_ref, dt, A, B_, C_, Dp, h0)[1].sum(), u_ref)
    torch.testing.assert_close(gu, gu_ref, atol=1e-5, rtol=1e-5)
    for start in (None, h0):  # gradients to dt and B through the final state and the outputs
        dt_, B2 = dt.clone().requires_grad_(), B_.clone().requires_grad_()
        y, h = kernels.mamba1_scan(u.detach(), dt_, A, B2, C_, Dp, start)
        got = torch.autograd.grad(y.pow(2).sum() + h.pow(2).sum(), (dt_, B2))
        dt_r, B_r = dt.clone().requires_grad_(), B_.clone().requires_grad_()
        y_r, h_r = selective_scan_naive(u.detach(), dt_r, A, B_r, C_, Dp, start)
        want = torch.autograd.grad(y_r.pow(2).sum() + h_r.pow(2).sum(), (dt_r, B_r))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_kernel_path_equals_torch_path_forward_state_and_decode(fake_kernels, mixer):
    kw = dict(n_layers=2, mixer=mixer, d_state=4, **(dict(headdim=8, ngroups=2, chunk_size=4) if mixer == "mamba2" else {}))
    torch.manual_seed(0)
    bb = MambaBackbone(D, MambaParams(**kw)).eval()
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        _, s0, _ = bb.set_impl("torch")(x[:, :4])
        s0 = {k: v + 0.3 * torch.randn_like(v) for k, v in s0.items()}
        outs = {}
        for impl in ("torch", "kernels"):
            bb.set_impl(impl)
            frozen = bb.snapshot(s0)
            y, s, _ = bb(x[:, 4:8], s0)
            y_t, s_t, _ = bb.step(x[:, 8], s)
            for k in s0:  # neither path touched the incoming state (the decode kernel works in place)
                assert torch.equal(s0[k], frozen[k])
            outs[impl] = (y, s, y_t, s_t)
    for a, b in zip(outs["torch"], outs["kernels"]):
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
