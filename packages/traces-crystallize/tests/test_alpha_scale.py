"""``traces.normalize``: an alpha in logits, large enough to change attention (issue #24)."""

import torch

from traces_crystallize import reference
from traces_crystallize.plugin import TransformerParams
from traces_crystallize.traces import TraceStore, attention_weights
from traces_crystallize.transformer import TransformerBackbone, apply_rotary


def planted_store(normalize: bool, alpha: float = 2.0) -> TraceStore:
    t = TraceStore(2, 8, alpha=alpha, learn_alpha=False, threshold=0.0, normalize=normalize)
    S = torch.full((2, 16), 0.2)
    S[:, 3] = 1.0
    t.update(S)  # one capture: M = (1 - 0.95) * S, at most 0.05
    return t


def mass_at(bias, d: int, T: int = 16) -> float:
    q = torch.zeros(1, 2, T, 8)  # uniform attention without the bias
    A = attention_weights(q, q, bias, 0)  # (1, 2, T, T)
    off = reference.offsets_matrix(T, T, 0)
    return float((A * (off == d)).sum(-1)[..., d:].mean())


def test_normalized_bias_is_alpha_logits_at_the_strongest_offset_and_moves_attention():
    raw, norm = planted_store(False), planted_store(True)
    torch.testing.assert_close(raw.dense(16).amax(1), torch.full((2,), 0.05))
    torch.testing.assert_close(norm.bias_vector(16, None)[:, 3], torch.full((2,), 2.0))
    torch.testing.assert_close(raw.bias_vector(16, None)[:, 3], torch.full((2,), 0.1))
    base = mass_at(None, 3)
    assert mass_at(raw.bias_vector(16, None), 3) - base < 0.02  # the prototype's scale: attention barely moves (+0.010)
    assert mass_at(norm.bias_vector(16, None), 3) - base > 0.1


def test_backbone_forward_reads_the_normalized_bias():
    """The layer's forward with ``normalize`` equals explicit attention with ``alpha * M / max M``."""
    tr = {"enabled": True, "warmup_steps": 0, "update_interval": 1, "threshold": 0.0, "alpha_warmup_steps": 0,
          "alpha": 2.0, "normalize": True}
    torch.manual_seed(0)
    bb = TransformerBackbone(TransformerParams(n_layers=1, n_heads=2, max_seq_len=32, traces=tr), 16).eval()
    x = torch.randn(2, 12, 16)
    bb.begin_step(1, x)  # a capture fills the traces
    store = bb.layers[0].attn.traces
    assert store.normalize and store.n_live > 0
    attn = bb.layers[0].attn
    h = bb.layers[0].ln_1(x)
    with torch.no_grad():
        y = attn(h, None, None, False)[0]
        q, k, v = attn.c_attn(h).view(2, 12, 3, 2, 8).unbind(2)
        cos, sin = attn._rope(0, 12)
        q = apply_rotary(q, cos[:, None], sin[:, None]).transpose(1, 2)
        k = apply_rotary(k, cos[:, None], sin[:, None]).transpose(1, 2)
        bias = 2.0 * store.dense(12) / store.val.amax(1, keepdim=True)
        ref = reference.attention(q, k, v.transpose(1, 2), 0, bias)  # (B, H, T, hd)
        ref = attn.c_proj(ref.transpose(1, 2).reshape(2, 12, 16))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
