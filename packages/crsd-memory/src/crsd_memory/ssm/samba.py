"""A Samba-style hybrid (Ren et al., 2024): Mamba layers interleaved with sliding-window attention.

    layer 2i:     x + Mamba(norm(x)),          then x + SwiGLU(norm(x))
    layer 2i + 1: x + WindowAttention(norm(x)), then x + SwiGLU(norm(x))

The Mamba layers are the ``mamba`` backbone's own blocks, built *through statelab's registry*
(``get_registry().get("backbone", "mamba")``, its params model and factory), not imported from
crsm-planner: a plugin may use only statelab's public API, and this way samba's Mamba is
exactly the one the `mamba` backbone trains (same kernels, same HF-compatible layout, same
tests), configured by ``samba.mamba`` with that backbone's own params. Without crsm-planner
installed, validation says so and how to install it. The window attention, small and
specific to Samba, is here.

Window attention: causal softmax attention of each token over the last ``window`` tokens
(itself included), rotary positions (relative, so a cache of unrotated keys needs no position
counter). The state is that cache, the last ``window - 1`` keys and values and which of its
slots hold a token (``valid``: a fresh state has none), so memory and per-token cost are
``O(window)`` however long the stream; the forward pass takes ``window`` queries at a time
against at most ``2 window - 1`` keys.

State per layer: Mamba layers ``conv``, ``ssm`` (the injectable entries); attention layers
``k``, ``v`` ``(B, window - 1, n_heads, d_head)`` and ``valid (B, window - 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab.errors import UserError
from statelab.interfaces import Aux, Layer, State
from statelab.plugins import get_registry

from crsd_memory.ssm.common import StackBackbone
from crsd_memory.ssm.params import MAMBA_MISSING
from crsd_memory.ssm.reference import window_attention_naive
from crsd_memory.ssm.retnet import rotate

class WindowAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.H, self.dh, self.window = n_heads, d_model // n_heads, window
        self.chunk_size, self.impl = window, "fast"  # queries per block of the forward pass
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("theta", 10000.0 ** (-torch.arange(0, self.dh, 2, dtype=torch.float32) / self.dh))

    def init_state(self, batch_size: int, device=None) -> State:
        W = self.window - 1
        return {"k": torch.zeros(batch_size, W, self.H, self.dh, device=device),
                "v": torch.zeros(batch_size, W, self.H, self.dh, device=device),
                "valid": torch.zeros(batch_size, W, device=device)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        Bt, T, D = x.shape
        W = self.window
        state = state or self.init_state(Bt, x.device)
        q, k, v = self.qkv(x).view(Bt, T, 3, self.H, self.dh).unbind(2)  # (B, T, H, dh) each
        K = torch.cat([state["k"].to(k.dtype), k], 1)  # (B, W-1+T, H, dh), unrotated
        V = torch.cat([state["v"].to(v.dtype), v], 1)
        valid = torch.cat([state["valid"], state["valid"].new_ones(Bt, T)], 1)  # (B, W-1+T)
        pos = torch.arange(W - 1 + T, device=x.device, dtype=torch.float32)
        Kr = rotate(K, pos[:, None, None] * self.theta)
        qr = rotate(q, pos[W - 1 :, None, None] * self.theta)
        if self.impl == "naive":
            o = window_attention_naive(qr, Kr, V, valid, W)
        else:
            outs = []
            for c0 in range(0, T, self.chunk_size):  # queries c0.. see keys c0 .. c0 + W - 1 + L
                L = min(self.chunk_size, T - c0)
                kpos = torch.arange(c0, c0 + W - 1 + L, device=x.device)
                qpos = torch.arange(c0 + W - 1, c0 + W - 1 + L, device=x.device)
                mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)  # (L, S)
                mask = mask[None, None] & valid[:, None, None, c0 : c0 + W - 1 + L].bool()  # (B, 1, L, S)
                o = F.scaled_dot_product_attention(qr[:, c0 : c0 + L].transpose(1, 2), Kr[:, c0 : c0 + W - 1 + L].transpose(1, 2),
                                                   V[:, c0 : c0 + W - 1 + L].transpose(1, 2), attn_mask=mask)
                outs.append(o.transpose(1, 2))  # (B, L, H, dh)
            o = torch.cat(outs, 1)
        new = {"k": K[:, T:], "v": V[:, T:], "valid": valid[:, T:]}  # the last W - 1 positions
        return self.o(o.reshape(Bt, T, D)), new

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        y, new = self.forward(x_t.unsqueeze(1), state)  # O(window) per token
        return y.squeeze(1), new


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, mult: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, 2 * mult * d_model, bias=False)
        self.down = nn.Linear(mult * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.up(x).chunk(2, -1)
        return self.down(F.silu(a) * b)


class AttentionBlock(Layer):
    """``x + WindowAttention(RMSNorm(x))``."""

    def __init__(self, d_model: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm = nn.RMSNorm(d_model)
        self.attn = WindowAttention(d_model, n_heads, window)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.attn.init_state(batch_size, device)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new = self.attn(self.norm(x), state or None)
        return x + y, new, {}


class SambaLayer(Layer):
    """A mixer layer (residual already inside) followed by a residual SwiGLU MLP."""

    def __init__(self, d_model: int, mixer: Layer, mlp_mult: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.mixer = mixer
        self.norm = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, mlp_mult)
        self.drop = nn.Dropout(dropout)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.mixer.init_state(batch_size, device, dtype)

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.drop(self.mlp(self.norm(x.to(self.norm.weight.dtype))))

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        x, new, aux = self.mixer(x, state or None)
        return self._mlp(x), new, aux

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        x_t, new, aux = self.mixer.step(x_t, state or None)
        return self._mlp(x_t), new, aux


def mamba_layers(params, ctx, n: int) -> list[Layer]:
    """``n`` blocks of the registered ``mamba`` backbone, configured by ``params.mamba``."""
    registry = get_registry()
    if ("backbone", "mamba") not in registry:
        raise UserError(MAMBA_MISSING)
    comp = registry.get("backbone", "mamba")
    mamba = comp.load_factory()(comp.params.model_validate({**params.mamba, "n_layers": n}), ctx)
    return list(mamba.layers)


def build(params, ctx) -> StackBackbone:
    """Factory of backbone ``samba``: even layers Mamba, odd layers window attention, each + MLP."""
    D = ctx.d_model
    mambas = iter(mamba_layers(params, ctx, (params.n_layers + 1) // 2))
    layers = [SambaLayer(D, next(mambas) if i % 2 == 0 else AttentionBlock(D, params.n_heads, params.window),
                         params.mlp_mult, params.dropout) for i in range(params.n_layers)]
    return StackBackbone(D, layers, "ssm")
