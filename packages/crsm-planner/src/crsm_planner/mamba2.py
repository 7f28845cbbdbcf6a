"""The Mamba-2 mixer (SSD) and its chunked pure-PyTorch scan.

Parameter names and shapes match HuggingFace ``transformers``' ``Mamba2Mixer``::

    in_proj   Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads)   z, xBC, dt
    conv1d    Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim), conv_dim = d_inner + 2 G N
    dt_bias   (nheads,)
    A_log     (nheads,)        A = -exp(A_log), one scalar decay per head
    D         (nheads,)
    norm      gated RMSNorm over d_inner (weight)
    out_proj  Linear(d_inner, d_model)

State: ``conv (B, d_conv - 1, conv_dim)`` and ``ssm (B, nheads, headdim, d_state)``, fp32.

The chunked SSD scan
--------------------
Because the decay is a scalar per head, the recurrence inside a chunk of ``L`` steps is a
masked "attention" ``y = (C B^T * decay) (dt x)``, done with batched matmuls; chunks are
connected by a short recurrence over the chunk-final states, started from the incoming
state ``h0``. Padding the sequence with ``dt = 0`` leaves the state untouched, so any
``T`` works and the returned state is exact. The result does not depend on ``L``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crsm_planner import kernels
from crsm_planner.conv import causal_conv, causal_conv_step
from crsm_planner.naive import ssd_naive
from crsm_planner.norm import RMSNormGated


def segsum(a: Tensor) -> Tensor:
    """``a (..., L)`` -> ``(..., L, L)`` with ``[i, j] = sum_{j < k <= i} a_k`` for ``i >= j``, else -inf.

    Built by a masked cumulative sum rather than ``cumsum_i - cumsum_j`` to avoid cancellation.
    """
    L = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, L)  # (..., L, L): x[..., k, j] = a_k
    not_strict, not_lower = _upper_masks(L, a.device)
    x = x.masked_fill(not_strict, 0.0)
    out = torch.cumsum(x, dim=-2)  # [i, j] = sum_{j < k <= i} a_k
    return out.masked_fill(not_lower, float("-inf"))


_MASKS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _upper_masks(L: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(j >= i, j > i)`` as ``(L, L)`` bool masks, cached per size and device in eager mode
    (six fewer kernel launches per call; under ``torch.compile`` they are built and folded)."""
    if torch.compiler.is_compiling():
        i = torch.arange(L, device=device)
        return i[None, :] >= i[:, None], i[None, :] > i[:, None]
    key = (L, device)
    if key not in _MASKS:
        i = torch.arange(L, device=device)
        _MASKS[key] = (i[None, :] >= i[:, None], i[None, :] > i[:, None])
    return _MASKS[key]


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
             chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Chunked SSD. ``x (Bt, T, H, P)``, ``dt (Bt, T, H)`` (after softplus), ``A (H,)``,
    ``B, C (Bt, T, G, N)``, ``D (H,)``, ``h0 (Bt, H, P, N)`` or None (zero state).
    Returns ``y (Bt, T, H, P)`` fp32 and the final state ``(Bt, H, P, N)``; same contract as
    :func:`~crsm_planner.naive.ssd_naive`."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    L = min(chunk_size, T)
    pad = (-T) % L
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    xdt = x * dt.unsqueeze(-1)  # (Bt, T, H, P)
    a = dt * A  # (Bt, T, H): log-decay per step
    if pad:  # dt = 0 steps: decay 1, no input, so the state passes through unchanged
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (T + pad) // L
    xc = xdt.view(Bt, nc, L, H, P)  # (Bt, c, L, H, P)
    Bc = B.view(Bt, nc, L, G, N).transpose(2, 3)  # (Bt, c, G, L, N)
    Cc = C.view(Bt, nc, L, G, N).transpose(2, 3)  # (Bt, c, G, L, N)
    ac = a.view(Bt, nc, L, H).transpose(2, 3)  # (Bt, c, H, L)
    a_cum = torch.cumsum(ac, dim=-1)  # (Bt, c, H, L)

    # 1. within chunks: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) dt_s x_s
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (Bt, c, G, L, L)
    M = CB.unsqueeze(3) * torch.exp(segsum(ac)).view(Bt, nc, G, R, L, L)  # (Bt, c, G, R, L, L)
    xh = xc.permute(0, 1, 3, 2, 4).reshape(Bt, nc, G, R, L, P)  # (Bt, c, G, R, L, P)
    y = torch.matmul(M, xh)  # (Bt, c, G, R, L, P)

    # 2. each chunk's own contribution to its final state: sum_s exp(a_cum_L - a_cum_s) dt_s x_s B_s^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (Bt, c, H, L)
    xw = xh * decay_to_end.view(Bt, nc, G, R, L, 1)  # (Bt, c, G, R, L, P)
    xw = xw.transpose(-1, -2).reshape(Bt, nc, G, R * P, L)  # (Bt, c, G, R*P, L)
    states = torch.matmul(xw, Bc).view(Bt, nc, H, P, N)  # (Bt, c, H, P, N)

    # 3. across chunks: h_c = exp(sum a over chunk c) h_{c-1} + states_c, from h0. Unrolled,
    # h_c = sum_{j <= c} exp(segsum(chunk log-decays))[c, j] states_j with h0 as states_{-1}:
    # one small matmul instead of a Python loop of nc steps (fewer kernel launches).
    h_init = torch.zeros(Bt, 1, H, P, N, device=x.device) if h0 is None else h0.float().unsqueeze(1)
    states = torch.cat([h_init, states], dim=1)  # (Bt, c+1, H, P, N)
    chunk_log = F.pad(a_cum[..., -1], (0, 0, 1, 0)).transpose(1, 2)  # (Bt, H, c+1): 0 for h0's slot
    mix = torch.exp(segsum(chunk_log))  # (Bt, H, c+1, c+1): [i, j] = decay from after chunk j-1 to after chunk i-1
    flat = states.permute(0, 2, 1, 3, 4).reshape(Bt, H, nc + 1, P * N)  # (Bt, H, c+1, P*N)
    hs = torch.matmul(mix, flat).view(Bt, H, nc + 1, P, N).transpose(1, 2)  # (Bt, c+1, H, P, N)
    S, h = hs[:, :-1], hs[:, -1].contiguous()  # (Bt, c, H, P, N) entering each chunk; (Bt, H, P, N) final

    # 4. the incoming state's contribution: y_l += exp(a_cum_l) C_l . h_in
    Sg = S.view(Bt, nc, G, R, P, N).permute(0, 1, 2, 5, 3, 4).reshape(Bt, nc, G, N, R * P)  # (Bt, c, G, N, R*P)
    y_off = torch.matmul(Cc, Sg).view(Bt, nc, G, L, R, P).transpose(3, 4)  # (Bt, c, G, R, L, P)
    y = y + y_off * torch.exp(a_cum).view(Bt, nc, G, R, L, 1)

    y = y.view(Bt, nc, H, L, P).transpose(2, 3).reshape(Bt, nc * L, H, P)[:, :T]  # (Bt, T, H, P)
    if D is not None:
        y = y + D.float()[:, None] * x
    return y, h


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
    """One step: ``x (Bt, H, P)``, ``dt (Bt, H)``, ``B, C (Bt, G, N)``, ``h (Bt, H, P, N)``."""
    Bt, H, P = x.shape
    G = B.shape[1]
    x, dt = x.float(), dt.float()
    Bh = B.float().repeat_interleave(H // G, dim=1)  # (Bt, H, N)
    Ch = C.float().repeat_interleave(H // G, dim=1)  # (Bt, H, N)
    dA = torch.exp(dt * A)  # (Bt, H)
    h = dA[:, :, None, None] * h + (dt.unsqueeze(-1) * x).unsqueeze(-1) * Bh.unsqueeze(2)  # (Bt, H, P, N)
    y = torch.matmul(h, Ch.unsqueeze(-1)).squeeze(-1)  # (Bt, H, P)
    if D is not None:
        y = y + D.float()[:, None] * x
    return y, h


class Mamba2Mixer(nn.Module):
    """SSD mixer: ``(B, T, d_model) -> (B, T, d_model)`` with state ``conv``, ``ssm``."""

    def __init__(self, d_model: int, *, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5,
                 use_kernels: str = "auto") -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"mamba2: d_inner={self.d_inner} is not divisible by headdim={headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"mamba2: nheads={self.nheads} is not divisible by ngroups={ngroups}")
        self.chunk_size = chunk_size
        self.use_kernels = use_kernels
        self.impl = "auto"  # "auto" | "torch" | "naive" | "kernels"; see MambaBackbone.set_impl
        Di, N, G, H = self.d_inner, d_state, ngroups, self.nheads
        self.conv_dim = Di + 2 * G * N
        self.in_proj = nn.Linear(d_model, 2 * Di + 2 * G * N + H, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias,
                                padding=d_conv - 1)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNormGated(Di, eps=norm_eps, group_size=Di // G)
        self.out_proj = nn.Linear(Di, d_model, bias=bias)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=torch.float32),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        }

    def _path(self, x: Tensor, op: str) -> str:
        if self.impl != "auto":
            return self.impl
        return "kernels" if kernels.wanted(self.use_kernels, x, (op,)) else "torch"

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def forward(self, x: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``state = None`` means the zero state."""
        Bt, T, _ = x.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        if state is None:
            conv0, h0 = torch.zeros(Bt, self.d_conv - 1, self.conv_dim, device=x.device), None
        else:
            conv0, h0 = state["conv"], state["ssm"]
        z, xBC, dt = self._split(self.in_proj(x))  # (B, T, Di), (B, T, conv_dim), (B, T, H)
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv0)
        xBC = F.silu(xBC)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
        path = self._path(x, "mamba_chunk_scan_combined")
        with torch.autocast(x.device.type, enabled=False):
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
            A = -torch.exp(self.A_log.float())  # (H,)
            args = (xs.float().view(Bt, T, H, P), dt, A, Bm.float().view(Bt, T, G, N), Cm.float().view(Bt, T, G, N),
                    self.D.float())
            if path == "kernels":
                y, h = kernels.mamba2_scan(*args, h0, self.chunk_size)
            elif path == "naive":
                y, h = ssd_naive(*args, h0)
            else:
                y, h = ssd_scan(*args, h0, self.chunk_size)
            y = self.norm(y.reshape(Bt, T, self.d_inner), z.float())  # (B, T, Di)
        out = self.out_proj(y.to(x.dtype))
        return out, {"conv": conv_state, "ssm": h}

    def step(self, x_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        Bt = x_t.shape[0]
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self._split(self.in_proj(x_t))  # (B, Di), (B, conv_dim), (B, H)
        xBC, conv_state = causal_conv_step(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, state["conv"])
        xBC = F.silu(xBC)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
        path = self._path(x_t, "selective_state_update")
        with torch.autocast(x_t.device.type, enabled=False):
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, H)
            A = -torch.exp(self.A_log.float())
            args = (xs.float().view(Bt, H, P), dt, A, Bm.float().view(Bt, G, N), Cm.float().view(Bt, G, N),
                    self.D.float(), state["ssm"].float())
            y, h = kernels.mamba2_step(*args) if path == "kernels" else ssd_step(*args)
            y = self.norm(y.reshape(Bt, self.d_inner), z.float())
        return self.out_proj(y.to(x_t.dtype)), {"conv": conv_state, "ssm": h}
