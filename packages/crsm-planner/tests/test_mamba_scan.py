"""The fast pure-PyTorch scans against the sequential references (fp32, random inputs,
non-zero initial states), values and gradients."""

import pytest
import torch

from crsm_planner.mamba1 import SelectiveScan, selective_scan, selective_step
from crsm_planner.mamba2 import segsum, ssd_scan, ssd_step
from crsm_planner.naive import selective_scan_naive, ssd_naive


def _m1_inputs(Bt=2, T=23, Di=6, N=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(Bt, T, Di), dt=torch.rand(Bt, T, Di, generator=g, dtype=dtype) * 0.6,
        A=-torch.rand(Di, N, generator=g, dtype=dtype) * 3, B=r(Bt, T, N), C=r(Bt, T, N), D=r(Di), h0=r(Bt, Di, N),
    )


def _m2_inputs(Bt=2, T=23, H=4, P=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        x=r(Bt, T, H, P), dt=torch.rand(Bt, T, H, generator=g) * 0.6, A=-torch.rand(H, generator=g) * 3,
        B=r(Bt, T, G, N), C=r(Bt, T, G, N), D=r(H), h0=r(Bt, H, P, N),
    )


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_selective_scan_matches_naive_with_initial_state(chunk):
    k = _m1_inputs()
    y, h = selective_scan(k["u"], k["dt"], k["A"], k["B"], k["C"], k["D"], k["h0"], chunk=chunk)
    y_ref, h_ref = selective_scan_naive(**k)
    _close(y, y_ref)
    _close(h, h_ref)


def test_selective_scan_gradients_match_naive_autograd():
    k = {n: v.requires_grad_() for n, v in _m1_inputs(T=19).items()}
    w = torch.randn(2, 19, 6)
    y, h = selective_scan(k["u"], k["dt"], k["A"], k["B"], k["C"], k["D"], k["h0"], chunk=4)
    grads = torch.autograd.grad((y * w).sum() + h.pow(2).sum(), list(k.values()))
    y_ref, h_ref = selective_scan_naive(**k)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + h_ref.pow(2).sum(), list(k.values()))
    for name, g, g_ref in zip(k, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_selective_scan_function_passes_float64_gradcheck():
    k = _m1_inputs(Bt=1, T=7, Di=3, N=2, dtype=torch.float64)
    args = [k[n].requires_grad_() for n in ("u", "dt", "A", "B", "C", "h0")]
    assert torch.autograd.gradcheck(lambda *a: SelectiveScan.apply(*a, 3), args)


def test_selective_step_continues_the_scan():
    k = _m1_inputs(T=9)
    y_ref, h_ref = selective_scan_naive(**k)
    h = k["h0"]
    for t in range(9):
        y_t, h = selective_step(k["u"][:, t], k["dt"][:, t], k["A"], k["B"][:, t], k["C"][:, t], k["D"], h)
        _close(y_t, y_ref[:, t])
    _close(h, h_ref)


def test_segsum_is_the_sum_over_the_open_closed_interval():
    a = torch.tensor([1.0, 2.0, 4.0])
    s = segsum(a)
    expected = torch.tensor([[0.0, -float("inf"), -float("inf")], [2.0, 0.0, -float("inf")], [6.0, 4.0, 0.0]])
    assert torch.equal(s, expected)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_ssd_scan_matches_naive_with_initial_state(chunk):
    k = _m2_inputs()
    y, h = ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], k["D"], k["h0"], chunk)
    y_ref, h_ref = ssd_naive(**k)
    _close(y, y_ref)
    _close(h, h_ref)


def test_ssd_scan_zero_state_and_gradients_match_naive():
    k = {n: v.requires_grad_() for n, v in _m2_inputs(T=13).items()}
    w = torch.randn(2, 13, 4, 3)
    y, h = ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], k["D"], k["h0"], 4)
    grads = torch.autograd.grad((y * w).sum() + h.pow(2).sum(), list(k.values()))
    y_ref, h_ref = ssd_naive(**k)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + h_ref.pow(2).sum(), list(k.values()))
    for name, g, g_ref in zip(k, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
    y0, h0 = ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], k["D"], None, 4)
    y0_ref, h0_ref = ssd_naive(k["x"], k["dt"], k["A"], k["B"], k["C"], k["D"], None)
    _close(y0, y0_ref)
    _close(h0, h0_ref)


def test_ssd_step_continues_the_scan():
    k = _m2_inputs(T=6)
    y_ref, h_ref = ssd_naive(**k)
    h = k["h0"]
    for t in range(6):
        y_t, h = ssd_step(k["x"][:, t], k["dt"][:, t], k["A"], k["B"][:, t], k["C"][:, t], k["D"], h)
        _close(y_t, y_ref[:, t])
    _close(h, h_ref)
