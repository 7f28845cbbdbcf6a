"""S5: the chunked associative scan against the sequential recurrence (values and gradients,
across chunk boundaries with a remainder, from a non-zero state); HiPPO-N init; conformance."""

import pytest
import torch

from statelab.build import BuildContext
from statelab.testing import check_backbone

from crsd_memory.ssm.params import S5Params
from crsd_memory.ssm.reference import linear_recurrence
from crsd_memory.ssm.s5 import S5Mixer, build, hippo_n_eigenvalues
from crsd_memory.ssm.scan import associative_scan, diagonal

D = 8


def make(**kw):
    return build(S5Params(**{"n_layers": 2, "d_state": 8, "chunk_size": 4, **kw}), BuildContext(D, 32, None, None))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_associative_scan_matches_loop(chunk):
    a = torch.complex(torch.rand(2, 19, 5), torch.randn(2, 19, 5))
    b = torch.complex(torch.randn(2, 19, 5), torch.randn(2, 19, 5))
    h0 = torch.complex(torch.randn(2, 5), torch.randn(2, 5))
    h, hT = associative_scan(a, b, h0, chunk, diagonal, diagonal)
    h_ref, hT_ref = linear_recurrence(a, b, h0)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hT, hT_ref, atol=1e-4, rtol=1e-4)


def _grads(mixer, u, x0):
    y, s = mixer(u, {"ssm": x0})
    return y, s["ssm"], torch.autograd.grad(y.pow(2).mean() + s["ssm"].pow(2).mean(), [u, x0, *mixer.parameters()])


@pytest.mark.parametrize("T", [1, 11])
def test_scan_matches_recurrence_values_and_gradients(T):
    mixer = S5Mixer(D, d_state=8, dt_min=0.01, dt_max=0.5, chunk_size=4)
    u = torch.randn(2, T, D, requires_grad=True)
    x0 = torch.randn(2, 4, 2, requires_grad=True)
    y, s, g = _grads(mixer, u, x0)
    mixer.impl = "naive"
    y_ref, s_ref, g_ref = _grads(mixer, u, x0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_hippo_n_eigenvalues_are_those_of_the_normal_part_of_legs():
    P = 8
    n = torch.arange(P, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    legs = torch.tril(-r[:, None] * r[None, :], -1) - torch.diag(n + 1)  # HiPPO-LegS
    p = torch.sqrt(n + 0.5)
    ev = torch.linalg.eigvals(legs + p[:, None] * p[None, :])  # its normal part
    ev = ev[ev.imag >= 0]
    lam = hippo_n_eigenvalues(P)
    torch.testing.assert_close(lam.real, torch.full((4,), -0.5))
    torch.testing.assert_close(lam.imag.double(), torch.sort(ev.imag).values, atol=1e-5, rtol=1e-5)


def test_conformance():
    bb = check_backbone(lambda: make(), D)
    assert bb.injectable_keys() == ["layers.0.ssm", "layers.1.ssm"]
