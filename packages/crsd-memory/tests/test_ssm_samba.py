"""Samba: window attention's blocked path against the one-query-at-a-time reference (values
and gradients, across blocks, from a partly filled cache); Mamba layers through the registry;
conformance; a clear error without crsm-planner."""

import pytest
import torch

from statelab.build import BuildContext
from statelab.plugins import set_registry
from statelab.spec import SpecError, validate_spec
from statelab.testing import check_backbone

from crsd_memory.ssm.params import SambaParams
from crsd_memory.ssm.samba import WindowAttention, build

D = 8
pytest.importorskip("crsm_planner", reason="samba's Mamba layers come from crsm-planner")


def make(**kw):
    p = SambaParams(**{"n_layers": 2, "window": 4, "n_heads": 2, "mamba": {"mixer": "mamba1", "d_state": 4}, **kw})
    return build(p, BuildContext(D, 32, None, None))


def _grads(attn, x, state):
    y, s = attn(x, state)
    return y, s, torch.autograd.grad(y.pow(2).mean(), [x, state["k"], state["v"], *attn.parameters()])


@pytest.mark.parametrize("T", [1, 11])
def test_blocked_window_attention_matches_reference(T):
    attn = WindowAttention(D, n_heads=2, window=4)
    x = torch.randn(2, T, D, requires_grad=True)
    state = {"k": torch.randn(2, 3, 2, 4, requires_grad=True), "v": torch.randn(2, 3, 2, 4, requires_grad=True),
             "valid": torch.tensor([[0.0, 1, 1], [0, 0, 0]])}  # row 0: two cached tokens, row 1: fresh
    y, s, g = _grads(attn, x, state)
    attn.impl = "naive"
    y_ref, s_ref, g_ref = _grads(attn, x, state)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for k in s:
        torch.testing.assert_close(s[k], s_ref[k])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_window_limits_what_a_token_sees():
    attn = WindowAttention(D, n_heads=2, window=3).eval()
    x = torch.randn(1, 10, D)
    x2 = x.clone()
    x2[:, 4] += 5.0
    y, _ = attn(x)
    y2, _ = attn(x2)
    changed = (y - y2).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 3 + [False] * 3  # token 4 is seen by 4, 5, 6 only


def test_layers_alternate_mamba_and_attention():
    bb = make(n_layers=3)
    assert [type(layer.mixer).__name__ for layer in bb.layers] == ["MambaBlock", "AttentionBlock", "MambaBlock"]
    assert bb.injectable_keys() == ["layers.0.ssm", "layers.2.ssm"]


def test_conformance():
    check_backbone(lambda: make(), D)


def test_without_crsm_planner_validation_says_what_to_install(registry):
    spec = {"name": "t", "tokenizer": {"kind": "byte"}, "tracking": {"enabled": False},
            "model": {"d_model": 16, "vocab_size": 32, "backbone": {"kind": "samba"}}}
    set_registry(registry)  # toys and crsd-memory only: no mamba
    try:
        with pytest.raises(SpecError, match="pip install crsm-planner"):
            validate_spec(spec, registry)
    finally:
        set_registry(None)
    with pytest.raises(SpecError, match=r"samba.mamba \(the mamba backbone's params\): mixr: Extra inputs are not permitted"):
        validate_spec({**spec, "model": {**spec["model"], "backbone": {"kind": "samba", "mamba": {"mixr": "x"}}}}, registry)
