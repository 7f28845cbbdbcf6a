"""HuggingFace ``transformers`` Mamba/Mamba2 weights load into ours and give the same logits.

``transformers`` is a test-only dependency (the ``test`` extra); without it these tests skip.
"""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'crsm-planner[test]' to run the HF parity tests")

from crsm_planner.hf_compat import load_hf_state_dict, model_from_hf, params_from_hf_config  # noqa: E402
from crsm_planner.backbone import MambaBackbone  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    transformers.utils.logging.set_verbosity_error()


def _perturb(model):
    """Random init leaves D = 1, zero biases, ones in the norms: move every tensor so the test sees them all."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _hf(kind):
    torch.manual_seed(0)
    if kind == "mamba1":
        cfg = transformers.MambaConfig(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                       conv_kernel=4, use_cache=False, use_bias=True)
        return _perturb(transformers.MambaForCausalLM(cfg).eval())
    cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                    head_dim=16, num_heads=4, n_groups=1, chunk_size=8, conv_kernel=4, use_cache=False)
    return _perturb(transformers.Mamba2ForCausalLM(cfg).eval())


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_hf_weights_give_equal_logits(kind):
    hf = _hf(kind)
    ours = model_from_hf(hf).eval()
    assert ours.backbone.mixer_kind == kind
    tokens = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
        logits, _, _ = ours(tokens)
        # decoding token by token after a prefix reaches the same logits
        _, s, _ = ours(tokens[:, :11])
        stepped = []
        for t in range(11, 19):
            lt, s, _ = ours.step(tokens[:, t], s)
            stepped.append(lt)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(stepped, 1), ref[:, 11:], atol=1e-4, rtol=1e-4)


def test_hf_parameter_names_and_shapes_match_ours():
    for kind in ("mamba1", "mamba2"):
        hf = _hf(kind)
        params, d_model, _ = params_from_hf_config(hf.config)
        ours = MambaBackbone(d_model, params).state_dict()
        theirs = {k[len("backbone."):]: v for k, v in hf.state_dict().items() if k.startswith("backbone.layers.")}
        assert {k: tuple(v.shape) for k, v in theirs.items()} == {
            k: tuple(v.shape) for k, v in ours.items() if k.startswith("layers.")}


def test_mismatched_hf_weights_are_refused_with_a_fix():
    hf = _hf("mamba1")
    params, d_model, _ = params_from_hf_config(hf.config, n_layers=1)
    with pytest.raises(KeyError, match="unexpected \\['layers.1"):
        load_hf_state_dict(MambaBackbone(d_model, params), hf.state_dict())
    params, d_model, _ = params_from_hf_config(hf.config, d_state=4)
    with pytest.raises(ValueError, match="HF tensor has shape"):
        load_hf_state_dict(MambaBackbone(d_model, params), hf.state_dict())
