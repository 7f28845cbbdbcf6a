"""The fused Triton recurrence against the reference PyTorch loop: values and gradients.

Runs where Triton can execute: on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (slow,
so the sizes are tiny). Skipped on installs without Triton (CPU-only torch). Note: Triton 3.6's
interpreter calls ``int()`` on 1-element numpy arrays, which numpy >= 2.4 refuses ("only
0-dimensional arrays can be converted"); use an older numpy there, or run on CUDA."""

import os

import pytest
import torch

from kssm_oscillators import fused
from kssm_oscillators.kssm import KuramotoLayer

pytestmark = pytest.mark.skipif(
    not fused.HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton on CUDA (or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, N, seed, strong=False):
    g = torch.Generator().manual_seed(seed)
    theta0 = (torch.rand(B, N, generator=g) * 2 - 1) * 3.14159
    rate, f_re, f_im = (torch.randn(B, T, N, generator=g) * 0.7 for _ in range(3))
    if strong:  # a strong field: the split integrator's exp(-|H| dt) gate saturates (Euler would turn chaotic)
        f_re[0, 2] *= 40.0
    coupling = torch.rand(B, T, N, generator=g)
    return [t.to(DEVICE).requires_grad_() for t in (theta0, rate, coupling, f_re, f_im)]


@pytest.mark.parametrize("integrator", ["euler", "split"])
@pytest.mark.parametrize("N,substeps,horizon", [(16, 1, 0), (24, 2, 3), (128, 3, 4)])
def test_fused_matches_reference_loop(N, substeps, horizon, integrator):
    B, T = 3, 9
    layer = KuramotoLayer(8, n_oscillators=N, group_levels=[1], substeps=substeps, grad_horizon=horizon, kernel="torch",
                          integrator=integrator)
    layer.train()
    ins = _inputs(B, T, N, seed=N + substeps, strong=integrator == "split")
    ref = layer.integrate(*ins)
    layer.kernel = "triton"
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    out = layer.integrate(*ins2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    w = torch.randn(B, T, N, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    # a smooth loss of the phases (the wrap makes the raw phases jump by 2 pi)
    g_ref = torch.autograd.grad((torch.sin(ref) * w).sum(), ins)
    g_out = torch.autograd.grad((torch.sin(out) * w).sum(), ins2)
    for name, a, b in zip(["theta0", "rate", "coupling", "f_re", "f_im"], g_out, g_ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"grad {n}: {m}")
    if horizon:  # the truncation is real: without it theta0's gradient differs
        assert g_ref[0].abs().sum() > 0


def test_fused_rejects_float64_with_a_clear_message():
    ins = [t.double() for t in _inputs(1, 2, 8, 0)]
    with pytest.raises(TypeError, match="runs in float32"):
        fused.fused_integrate(*ins, dt=0.5, substeps=1)
