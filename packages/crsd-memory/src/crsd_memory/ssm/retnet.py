"""RetNet: multi-scale retention (Sun et al., 2023) in its parallel, chunkwise and recurrent forms.

Per head ``h`` with decay ``gamma_h = 1 - 2^(-5-h)``, queries and keys rotated by position
(xPos/RoPE angles ``theta``), retention is

    parallel:   O = (Q K^T * Dm) V,    Dm[n, m] = gamma^(n-m) for n >= m, else 0
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,   o_n = q_n S_n
    chunkwise:  inside a chunk the parallel form, plus q_j gamma^(j+1) R_{i-1} from the state
                R_i = gamma^L R_{i-1} + sum_j gamma^(L-1-j) k_j^T v_j carried between chunks

and the three are equal. The state kept between calls does not depend on the absolute
position: the rotation is folded into it (``S_n = gamma rot(S_{n-1}, -theta) + k_n^T v_n``,
so ``q_n . k_m`` always meets the relative rotation ``(n - m) theta``). ``forward`` rotates
by positions ``1..T`` local to the call and turns the final state back by ``T`` steps.

    MSR(X) = W_O (swish(W_G X) * GroupNorm_heads(Retention(X)))
    block(x) = x + MSR(LN(x)); x + FFN(LN(x))      FFN: Linear, GELU, Linear

The retention-score normalisations of the paper's parallel form only rescale each head's
output row, which the per-head GroupNorm removes, so they are left out (all forms agree).

State per layer: ``S (B, n_heads, d_model / n_heads, value_factor * d_model / n_heads)``
float32; it is the injectable entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab.interfaces import Aux, Layer, State

from crsd_memory.ssm.common import StackBackbone
from crsd_memory.ssm.reference import retention_naive


def rotate(x: Tensor, angle: Tensor, dim: int = -1) -> Tensor:
    """Turn each (even, odd) pair along ``dim`` of ``x`` by ``angle`` (broadcast against the
    ``(..., size / 2)`` pairs, with ``dim`` moved last)."""
    x = x.movedim(dim, -1)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., n/2) each
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).movedim(-1, dim)


def _decay_matrix(log_gamma: Tensor, L: int) -> Tensor:
    """``(H, L, L)``: ``gamma^(n-m)`` for ``n >= m``, else 0."""
    i = torch.arange(L, device=log_gamma.device)
    diff = (i[:, None] - i[None, :]).float()  # (L, L)
    return torch.where(diff >= 0, torch.exp(log_gamma[:, None, None] * diff.clamp(min=0)), 0.0)


def retention_parallel(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, S0: Tensor) -> tuple[Tensor, Tensor]:
    """Rotated ``q, k (B, T, H, dk)``, ``v (B, T, H, dv)``, ``log_gamma (H,)``, incoming state
    ``S0 (B, H, dk, dv)`` in the rotated frame -> ``o (B, T, H, dv)`` and the state after ``T``
    tokens, still in the rotated frame."""
    T = q.shape[1]
    Dm = _decay_matrix(log_gamma, T)  # (H, T, T)
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * Dm
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
    t = torch.arange(T, device=q.device, dtype=q.dtype)
    from_state = torch.exp(log_gamma[None, :] * (t[:, None] + 1))  # (T, H): gamma^(n+1)
    o = o + torch.einsum("bnhk,bhkv->bnhv", q, S0) * from_state[None, :, :, None]
    to_end = torch.exp(log_gamma[None, :] * (T - 1 - t[:, None]))  # (T, H): gamma^(T-1-m)
    S = torch.exp(log_gamma * T)[None, :, None, None] * S0 + torch.einsum("bmhk,bmhv,mh->bhkv", k, v, to_end)
    return o, S


def retention_chunkwise(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, S0: Tensor,
                        chunk_size: int) -> tuple[Tensor, Tensor]:
    """:func:`retention_parallel` ``chunk_size`` tokens at a time, the state carried between
    chunks: ``O(T chunk_size)`` instead of ``O(T^2)``. Same arguments and results."""
    outs, S = [], S0
    for c0 in range(0, q.shape[1], chunk_size):
        sl = slice(c0, c0 + chunk_size)
        o, S = retention_parallel(q[:, sl], k[:, sl], v[:, sl], log_gamma, S)
        outs.append(o)
    return torch.cat(outs, 1), S


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, value_factor: int = 2, mode: str = "chunkwise",
                 chunk_size: int = 64) -> None:
        super().__init__()
        D, H = d_model, n_heads
        self.H, self.dk, self.dv = H, D // H, value_factor * D // H
        self.mode, self.chunk_size, self.impl = mode, chunk_size, "fast"
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, H * self.dv, bias=False)
        self.g = nn.Linear(D, H * self.dv, bias=False)
        self.o = nn.Linear(H * self.dv, D, bias=False)
        self.group_norm = nn.GroupNorm(H, H * self.dv)
        self.register_buffer("log_gamma", torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))))
        self.register_buffer("theta", 10000.0 ** (-torch.arange(0, self.dk, 2, dtype=torch.float32) / self.dk))

    def init_state(self, batch_size: int, device=None) -> State:
        return {"S": torch.zeros(batch_size, self.H, self.dk, self.dv, device=device)}

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape[:-1]
        q = self.q(x).float().view(*shape, self.H, self.dk)
        k = self.k(x).float().view(*shape, self.H, self.dk) / math.sqrt(self.dk)
        v = self.v(x).float().view(*shape, self.H, self.dv)
        return q, k, v

    def _out(self, o: Tensor, x: Tensor) -> Tensor:
        """GroupNorm per head, swish gate, output projection: ``o (..., H, dv)``."""
        shape = o.shape[:-2]
        y = self.group_norm(o.reshape(-1, self.H * self.dv)).view(*shape, self.H * self.dv)
        return self.o(F.silu(self.g(x)) * y.to(x.dtype))

    def forward(self, x: Tensor, state: State | None) -> tuple[Tensor, State]:
        Bt, T, _ = x.shape
        S0 = state["S"].float() if state else torch.zeros(Bt, self.H, self.dk, self.dv, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = self._qkv(x)
            if self.impl == "naive" or self.mode == "recurrent":
                o, S = retention_naive(q, k, v, torch.exp(self.log_gamma), self.theta, S0)
            else:
                ang = (torch.arange(T, device=x.device, dtype=torch.float32) + 1)[:, None, None] * self.theta  # (T, 1, dk/2)
                q, k = rotate(q, ang), rotate(k, ang)
                if self.mode == "parallel":
                    o, S = retention_parallel(q, k, v, self.log_gamma, S0)
                else:
                    o, S = retention_chunkwise(q, k, v, self.log_gamma, S0, self.chunk_size)
                S = rotate(S, -T * self.theta, dim=-2)  # back to the position-free frame
        return self._out(o, x), {"S": S}

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        with torch.autocast(x_t.device.type, enabled=False):
            q, k, v = self._qkv(x_t)  # (B, H, dk), (B, H, dk), (B, H, dv)
            gamma = torch.exp(self.log_gamma)[:, None, None]
            S = gamma * rotate(state["S"].float(), -self.theta, dim=-2) + k[..., :, None] * v[..., None, :]
            o = torch.einsum("bhk,bhkv->bhv", q, S)
        return self._out(o, x_t), {"S": S}


class RetNetLayer(Layer):
    def __init__(self, d_model: int, params) -> None:
        super().__init__()
        D = self.d_model = d_model
        self.norm1 = nn.LayerNorm(D)
        self.msr = MultiScaleRetention(D, params.n_heads, params.value_factor, params.mode, params.chunk_size)
        self.norm2 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, params.ffn_mult * D), nn.GELU(), nn.Linear(params.ffn_mult * D, D))
        self.drop = nn.Dropout(params.dropout)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.msr.init_state(batch_size, device)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new = self.msr(self.norm1(x), state or None)
        x = x + self.drop(y)
        return x + self.drop(self.ffn(self.norm2(x))), new, {}

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        state = state or self.init_state(x_t.shape[0], x_t.device)
        y, new = self.msr.step(self.norm1(x_t), state)
        x_t = x_t + self.drop(y)
        return x_t + self.drop(self.ffn(self.norm2(x_t))), new, {}


def build(params, ctx) -> StackBackbone:
    """Factory of backbone ``retnet``."""
    return StackBackbone(ctx.d_model, [RetNetLayer(ctx.d_model, params) for _ in range(params.n_layers)], "S")
