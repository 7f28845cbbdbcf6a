"""Hebbian associative memory: per-head ``H <- gamma H + eta k_hat v^T``, cosine recall.

Config (``HebbianParams`` in plugin.py): ``n_heads``, ``d_head``, ``temperature``, ``topk``,
``detach``, ``decay_min``/``decay_max`` (gamma = lo + (hi - lo) sigmoid(theta), per head),
``lr_max`` (eta = lr_max sigmoid(phi), per head), ``chunk_size``, ``write_gate`` (a learned
per-token, per-head write strength ``w_t = sigmoid(W_w x_t)`` that scales each write, so the
memory can learn to store some tokens and skip the rest).

The forward pass is the chunked, causal, linear-attention form of the recurrence in
reference.py. Inside a chunk of length C starting from ``H0``, with ``i, j`` positions in
the chunk::

    r_i  = [ sum_{j<=i} gamma^(i-j) eta (q_i . k_j) w_j v_j  +  gamma^(i+1) q_i^T H0 ] / temperature
    H_C  = gamma^C H0 + sum_j gamma^(C-1-j) eta k_j w_j v_j^T

(the write strengths ``w_j`` only scale the values, so they enter as ``v_j <- w_j v_j``).

so a sequence costs O(T C d + T d^2) in a handful of matmuls per chunk instead of T
sequential rank-1 updates. The decay powers are computed as exp((i-j) log gamma) with the
upper triangle masked before the exp, so nothing overflows. Memory math runs in fp32
whatever the autocast dtype (the state H is always fp32).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from statelab.interfaces import State

from crsd_memory.gated import GatedRecallMemory
from crsd_memory.reference import hebbian_step, topk_magnitude, unit


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def hebbian_chunked(
    q: Tensor, k: Tensor, v: Tensor, H: Tensor, gamma: Tensor, eta: Tensor, temperature: float, topk: int | None,
    chunk_size: int, w: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunked form of :func:`crsd_memory.reference.hebbian_sequence` (same arguments and
    results): ``q, k`` unit vectors and ``v`` (B, heads, T, d); ``H`` (B, heads, d, d); ``gamma,
    eta`` (heads,); ``w`` (B, heads, T) write strengths or None. Returns ``(r (B, heads, T, d), H_T)``.

    One chunk at a time: every intermediate is (B, heads, C, C) or (B, heads, C, d), small
    enough to stay in cache, which on CPUs beats batching all chunks into a few large matmuls.
    """
    B, h, T, d = q.shape
    if w is not None:
        v = v * w.unsqueeze(-1)  # (B, h, T, d)
    log_g = torch.log(gamma)  # (h,)

    def consts(C: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pos = torch.arange(C, device=q.device, dtype=torch.float32)
        diff = pos[:, None] - pos[None, :]  # (C, C) i - j
        logd = torch.where(diff >= 0, diff * log_g[:, None, None], torch.full_like(diff, -math.inf))  # (h, C, C)
        decay = torch.exp(logd) * (eta / temperature)[:, None, None]  # (h, C, C) eta gamma^(i-j) / temp; 0 above diag
        g_in = (torch.exp((pos + 1)[None, :] * log_g[:, None]) / temperature)[:, :, None]  # (h, C, 1) g^(i+1)/temp
        g_out = (torch.exp((C - 1 - pos)[None, :] * log_g[:, None]) * eta[:, None])[:, :, None]  # (h, C, 1)
        carry = torch.exp(C * log_g)[:, None, None]  # (h, 1, 1) gamma^C
        return decay, g_in, g_out, carry

    full = consts(min(chunk_size, T))
    out = q.new_empty(B, h, T, d)
    for c0 in range(0, T, chunk_size):
        qc, kc, vc = (z[:, :, c0 : c0 + chunk_size] for z in (q, k, v))  # (B, h, C, d)
        C = qc.shape[2]
        decay, g_in, g_out, carry = full if C == full[0].shape[-1] else consts(C)
        intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # (B, h, C, d)
        # r = intra + (q gamma^(i+1)) @ H, the product accumulated into intra by the GEMM
        r = torch.baddbmm(intra.reshape(B * h, C, d), (qc * g_in).reshape(B * h, C, d), H.reshape(B * h, d, d))
        out[:, :, c0 : c0 + C] = r.reshape(B, h, C, d)  # (B, h, C, d)
        H = carry * H + (kc * g_out).transpose(-1, -2) @ vc  # (B, h, d, d)
    return topk_magnitude(out, topk), H


class HebbianRecall(nn.Module):
    """The memory itself, without the residual: ``x (B, T, d_in) -> recall (B, T, d_out)``.

    State: ``{"H": (B, n_heads, d_head, d_head)}`` in fp32.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_heads: int = 4,
        d_head: int | None = None,
        temperature: float = 1.0,
        topk: int | None = None,
        detach: bool = False,
        decay_min: float = 0.5,
        decay_max: float = 0.999,
        lr_max: float = 1.0,
        chunk_size: int = 64,
        write_gate: bool = False,
    ) -> None:
        super().__init__()
        d_head = d_head or max(1, d_in // n_heads)
        if topk is not None and topk > d_head:
            raise ValueError(f"hebbian: topk ({topk}) cannot exceed d_head ({d_head}); lower topk or raise d_head")
        self.n_heads, self.d_head = n_heads, d_head
        self.temperature, self.topk, self.detach = temperature, topk, detach
        self.decay_min, self.decay_max, self.lr_max = decay_min, decay_max, lr_max
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(d_in, 3 * n_heads * d_head, bias=False)
        self.out = nn.Linear(n_heads * d_head, d_out, bias=False)
        self.write_gate = nn.Linear(d_in, n_heads) if write_gate else None
        # heads start with decays spread over [0.9, 0.99] (clipped to the allowed range) and eta = lr_max / 2
        target = torch.linspace(0.9, 0.99, n_heads).clamp(decay_min + 1e-3, decay_max - 1e-3)
        frac = (target - decay_min) / (decay_max - decay_min)
        self.decay_logit = nn.Parameter(torch.log(frac / (1 - frac)))
        self.rate_logit = nn.Parameter(torch.zeros(n_heads))

    def gamma(self) -> Tensor:
        return self.decay_min + (self.decay_max - self.decay_min) * torch.sigmoid(self.decay_logit.float())

    def eta(self) -> Tensor:
        return self.lr_max * torch.sigmoid(self.rate_logit.float())

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (batch_size, self.n_heads, self.d_head, self.d_head)
        return {"H": torch.zeros(shape, device=device, dtype=torch.float32)}

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d_in) -> unit q, unit k, v, each (B, heads, T, d_head) in fp32."""
        B, T, _ = x.shape
        qkv = self.qkv(x).float().view(B, T, 3, self.n_heads, self.d_head)  # (B, T, 3, h, d)
        qkv = qkv.permute(2, 0, 3, 1, 4).contiguous()  # (3, B, h, T, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return unit(q), unit(k), v

    def _write_strength(self, x: Tensor) -> Tensor | None:
        """(B, T, d_in) -> w (B, heads, T) in (0, 1), or None without a write gate."""
        if self.write_gate is None:
            return None
        return torch.sigmoid(self.write_gate(x).float()).transpose(1, 2)  # (B, h, T)

    def _write_params(self) -> tuple[Tensor, Tensor]:
        gamma, eta = self.gamma(), self.eta()
        if self.detach:
            gamma, eta = gamma.detach(), eta.detach()
        return gamma, eta

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B, T, _ = x.shape
        H = state["H"] if state else self.init_state(B, x.device)["H"]
        with _no_autocast(x):
            q, k, v = self._project(x)
            w = self._write_strength(x)
            gamma, eta = self._write_params()
            if self.detach:
                k, v, H = k.detach(), v.detach(), H.detach()
                w = None if w is None else w.detach()
            r, H = hebbian_chunked(q, k, v, H, gamma, eta, self.temperature, self.topk, self.chunk_size, w)
            r = r.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, h*d)
        return self.out(r.to(x.dtype)), {"H": H}

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B = x_t.shape[0]
        H = state["H"] if state else self.init_state(B, x_t.device)["H"]
        with _no_autocast(x_t):
            q, k, v = (z[:, :, 0] for z in self._project(x_t.unsqueeze(1)))  # (B, h, d)
            w = self._write_strength(x_t.unsqueeze(1))
            w = None if w is None else w[:, :, 0]  # (B, h)
            gamma, eta = self._write_params()
            if self.detach:
                k, v, H = k.detach(), v.detach(), H.detach()
                w = None if w is None else w.detach()
            r, H = hebbian_step(q, k, v, H, gamma, eta, self.temperature, self.topk, w)
            r = r.reshape(B, self.n_heads * self.d_head)  # (B, h*d)
        return self.out(r.to(x_t.dtype)), {"H": H}


class HebbianMemory(GatedRecallMemory):
    """``h_out = h + g * recall`` with ``recall = HebbianRecall(LayerNorm(h))`` and a
    per-channel gate ``g = sigmoid(W_g LayerNorm(h))``. Publishes ``memory.recall`` and
    ``memory.gate``. State: ``{"H": (B, heads, d_head, d_head)}``."""

    def __init__(self, d_model: int, **kw) -> None:
        super().__init__(d_model, HebbianRecall(d_model, d_model, **kw))


def hebbian_kwargs(params) -> dict:
    return dict(
        n_heads=params.n_heads, d_head=params.d_head, temperature=params.temperature, topk=params.topk,
        detach=params.detach, decay_min=params.decay_min, decay_max=params.decay_max, lr_max=params.lr_max,
        chunk_size=params.chunk_size, write_gate=params.write_gate,
    )


def build(params, ctx) -> HebbianMemory:
    return HebbianMemory(ctx.d_model, **hebbian_kwargs(params))
