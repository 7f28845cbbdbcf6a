"""LinOSS: the 2x2-block associative scan against the oscillator stepped one token at a time
(IM and IMEX, values and gradients, across chunk boundaries, from a non-zero state); the
discretisations' stability properties; conformance."""

import pytest
import torch

from statelab.build import BuildContext
from statelab.testing import check_backbone

from crsd_memory.ssm.linoss import LinOSSMixer, build
from crsd_memory.ssm.params import LinOSSParams

D = 8


def make(**kw):
    return build(LinOSSParams(**{"n_layers": 2, "d_state": 6, "chunk_size": 4, **kw}), BuildContext(D, 32, None, None))


def _grads(mixer, u, x0):
    y, s = mixer(u, {"ssm": x0})
    return y, s["ssm"], torch.autograd.grad(y.pow(2).mean() + s["ssm"].pow(2).mean(), [u, x0, *mixer.parameters()])


@pytest.mark.parametrize("variant", ["im", "imex"])
@pytest.mark.parametrize("T", [1, 11])
def test_scan_matches_oscillator_loop(variant, T):
    mixer = LinOSSMixer(D, d_state=6, variant=variant, chunk_size=4)
    with torch.no_grad():
        mixer.A_hat.mul_(3)  # some oscillators beyond the init range
    u = torch.randn(2, T, D, requires_grad=True)
    x0 = torch.randn(2, 6, 2, requires_grad=True)
    y, s, g = _grads(mixer, u, x0)
    mixer.impl = "naive"
    y_ref, s_ref, g_ref = _grads(mixer, u, x0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_im_dissipates_and_imex_conserves_volume():
    m = LinOSSMixer(4, d_state=16, variant="im")
    M, _ = m.transition()
    A, dt = m.coefficients()
    ev = torch.linalg.eigvals(M.double()).abs()  # (P, 2)
    torch.testing.assert_close(ev, torch.sqrt(1 / (1 + dt**2 * A)).double()[:, None].expand(-1, 2), atol=1e-6, rtol=1e-6)
    m.variant = "imex"
    M, _ = m.transition()
    torch.testing.assert_close(torch.linalg.det(M), torch.ones(16), atol=1e-6, rtol=0)


def test_conformance():  # imex: through a model in test_ssm_models.py
    bb = check_backbone(lambda: make(variant="im"), D)
    assert bb.injectable_keys() == ["layers.0.ssm", "layers.1.ssm"]
