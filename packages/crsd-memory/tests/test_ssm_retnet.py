"""RetNet: the parallel, chunkwise and recurrent forms of retention agree (values and
gradients, across chunk boundaries with a remainder and from a non-zero state); conformance."""

import pytest
import torch

from statelab.build import BuildContext
from statelab.testing import check_backbone

from crsd_memory.ssm.params import RetNetParams
from crsd_memory.ssm.retnet import MultiScaleRetention, build, rotate

D = 8


def make(**kw):
    return build(RetNetParams(**{"n_layers": 2, "n_heads": 2, "chunk_size": 4, **kw}), BuildContext(D, 32, None, None))


def _run(msr, x, S0, mode):
    msr.mode, msr.impl = mode, "fast"
    y, s = msr(x, {"S": S0})
    loss = y.pow(2).mean() + s["S"].pow(2).mean()
    return y, s["S"], torch.autograd.grad(loss, [x, S0, *msr.parameters()])


@pytest.mark.parametrize("T", [1, 4, 11])
def test_three_forms_agree(T):
    msr = MultiScaleRetention(D, n_heads=2, value_factor=2, chunk_size=4)
    x = torch.randn(2, T, D, requires_grad=True)
    S0 = torch.randn(2, 2, 4, 8, requires_grad=True)
    ref = _run(msr, x, S0, "recurrent")
    for mode in ("parallel", "chunkwise"):
        y, S, g = _run(msr, x, S0, mode)
        torch.testing.assert_close(y, ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(S, ref[1], atol=1e-5, rtol=1e-4)
        for a, b in zip(g, ref[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_scores_depend_on_relative_position_only():
    theta = torch.rand(3)
    q, k = torch.randn(6), torch.randn(6)
    s1 = rotate(q, 5 * theta) @ rotate(k, 2 * theta)
    s2 = rotate(q, 13 * theta) @ rotate(k, 10 * theta)
    torch.testing.assert_close(s1, s2)


def test_decays_are_multi_scale():
    msr = MultiScaleRetention(D, n_heads=4, value_factor=1)
    torch.testing.assert_close(torch.exp(msr.log_gamma), torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8]))


def test_conformance():
    bb = check_backbone(lambda: make(), D)
    assert bb.injectable_keys() == ["layers.0.S", "layers.1.S"]
