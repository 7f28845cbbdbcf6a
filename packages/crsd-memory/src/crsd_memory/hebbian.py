"""Hebbian associative memory: per-head ``H <- gamma H + eta k_hat v^T``, cosine recall.

Config (``HebbianParams`` in plugin.py): ``n_heads``, ``d_head``, ``temperature``, ``topk``,
``detach``, ``decay_min``/``decay_max`` (gamma = lo + (hi - lo) sigmoid(theta), per head),
``lr_max`` (eta = lr_max sigmoid(phi), per head), ``chunk_size``, ``write_gate`` (a learned
per-token, per-head write strength ``w_t = sigmoid(W_w x_t)`` that scales each write, so the
memory can learn to store some tokens and skip the rest).

Options beyond the seed's rule (the defaults keep the seed's rule exactly):

* ``rule: delta`` -- the delta rule (DeltaNet): a write replaces what the key already
  recalls, ``H <- H + beta_t k_t (v_t - H^T k_t)^T`` with ``beta_t = eta w_t``, instead of
  adding to it; overwriting instead of superposing is what lets a d x d matrix hold ~d
  associations without their cross-talk piling up.
* ``decay: token`` -- input-dependent forgetting (Gated DeltaNet / GLA): per token and head,
  ``a_t = exp(-softplus(W_a x_t + b_a))``, with ``b_a`` set so the heads start at decays
  spread over [0.95, 0.999] (close to 1: remember by default, learn when to forget).
* ``key_conv: K`` -- a short causal depthwise convolution (width K) over the key projection
  before normalisation (as in Mamba, DeltaNet): a key can mix the previous tokens, e.g.
  the key token before a value; the last K-1 key projections are part of the state.

These general writes run through :func:`crsd_memory.delta.memory_chunked` (reference
:func:`crsd_memory.reference.memory_sequence`); the seed's rule keeps its own chunked form
below.

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

import torch.nn.functional as F

from crsd_memory.delta import memory_chunked
from crsd_memory.gated import GatedRecallMemory
from crsd_memory.reference import hebbian_step, memory_step, topk_magnitude, unit


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

    State: ``{"H": (B, n_heads, d_head, d_head)}`` in fp32, plus ``"conv": (B, key_conv - 1,
    n_heads * d_head)`` (the last key projections, oldest first) with a key convolution.
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
        rule: str = "hebbian",
        decay: str = "head",
        key_conv: int | None = None,
    ) -> None:
        super().__init__()
        d_head = d_head or max(1, d_in // n_heads)
        if topk is not None and topk > d_head:
            raise ValueError(f"hebbian: topk ({topk}) cannot exceed d_head ({d_head}); lower topk or raise d_head")
        if rule not in ("hebbian", "delta") or decay not in ("head", "token"):
            raise ValueError(f"hebbian: rule must be hebbian or delta (got {rule!r}), decay head or token ({decay!r})")
        self.rule, self.decay, self.key_conv = rule, decay, key_conv
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
        # with decay: token the per-token decay replaces the per-head one
        self.decay_logit = nn.Parameter(torch.log(frac / (1 - frac))) if decay == "head" else None
        self.rate_logit = nn.Parameter(torch.zeros(n_heads))
        self.decay_proj = None
        if decay == "token":
            self.decay_proj = nn.Linear(d_in, n_heads)
            start = -torch.log(torch.linspace(0.95, 0.999, n_heads))  # softplus(b_a) = -log a
            with torch.no_grad():
                self.decay_proj.weight.mul_(0.1)
                self.decay_proj.bias.copy_(start + torch.log(-torch.expm1(-start)))  # inverse softplus
        self.conv_weight = None
        if key_conv is not None:
            # (channels, K), uniform in +-1/sqrt(K) like nn.Conv1d: every key starts as a random mix of
            # the last K tokens. (A near-identity start, keys = the token's own, learned MQAR far slower.)
            bound = key_conv**-0.5
            self.conv_weight = nn.Parameter(torch.empty(n_heads * d_head, key_conv).uniform_(-bound, bound))

    @property
    def faithful(self) -> bool:
        """The seed's rule: Hebbian write, one learned decay per head, no key convolution."""
        return self.rule == "hebbian" and self.decay == "head" and self.key_conv is None

    def gamma(self) -> Tensor | None:
        """The per-head decay (heads,), or None with ``decay: token``."""
        if self.decay_logit is None:
            return None
        return self.decay_min + (self.decay_max - self.decay_min) * torch.sigmoid(self.decay_logit.float())

    def eta(self) -> Tensor:
        return self.lr_max * torch.sigmoid(self.rate_logit.float())

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (batch_size, self.n_heads, self.d_head, self.d_head)
        state = {"H": torch.zeros(shape, device=device, dtype=torch.float32)}
        if self.key_conv is not None:
            state["conv"] = torch.zeros(batch_size, self.key_conv - 1, self.n_heads * self.d_head, device=device)
        return state

    def _conv_keys(self, k: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise convolution of ``k`` (B, T, h*d) continuing ``past`` (B, K-1, h*d);
        reference: :func:`crsd_memory.reference.causal_conv_sequence`."""
        full = torch.cat([past, k], dim=1)  # (B, K-1+T, h*d)
        y = F.conv1d(full.transpose(1, 2), self.conv_weight.float().unsqueeze(1), groups=full.shape[-1])
        return y.transpose(1, 2), full[:, full.shape[1] - (self.key_conv - 1) :]  # (B, T, h*d), (B, K-1, h*d)

    def _project(self, x: Tensor, state: State | None = None) -> tuple[Tensor, Tensor, Tensor, State]:
        """(B, T, d_in) -> unit q, unit k, v, each (B, heads, T, d_head) in fp32, and the
        convolution's next state (empty without one)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).float().chunk(3, dim=-1)  # (B, T, h*d) each
        conv: State = {}
        if self.key_conv is not None:
            past = state["conv"] if state else self.init_state(B, x.device)["conv"]
            k, conv["conv"] = self._conv_keys(k, past)

        def heads(z: Tensor) -> Tensor:
            return z.view(B, T, self.n_heads, self.d_head).transpose(1, 2).contiguous()  # (B, h, T, d)

        return unit(heads(q)), unit(heads(k)), heads(v), conv

    def _log_decay(self, x: Tensor, gamma: Tensor | None) -> Tensor:
        """Log decay broadcastable to (B, heads, T): per token with ``decay: token``, else log gamma."""
        if self.decay_proj is None:
            return torch.log(gamma)[:, None]  # (h, 1)
        return -F.softplus(self.decay_proj(x).float()).transpose(1, 2)  # (B, h, T)

    def _write_strength(self, x: Tensor) -> Tensor | None:
        """(B, T, d_in) -> w (B, heads, T) in (0, 1), or None without a write gate."""
        if self.write_gate is None:
            return None
        return torch.sigmoid(self.write_gate(x).float()).transpose(1, 2)  # (B, h, T)

    def _write_params(self) -> tuple[Tensor | None, Tensor]:
        gamma, eta = self.gamma(), self.eta()
        if self.detach:
            gamma, eta = None if gamma is None else gamma.detach(), eta.detach()
        return gamma, eta

    def _inputs(self, x: Tensor, state: State | None):
        """Everything the write needs, in fp32 (detached where ``detach`` says): unit q, k and
        v (B, h, T, d), H, gamma, eta (h,), write strengths w (B, h, T) or None, log decay
        (broadcastable to (B, h, T)) and the convolution's next state."""
        H = state["H"] if state else self.init_state(x.shape[0], x.device)["H"]
        q, k, v, conv = self._project(x, state)
        w = self._write_strength(x)
        gamma, eta = self._write_params()
        log_a = self._log_decay(x, gamma)
        if self.detach:
            k, v, H, log_a = k.detach(), v.detach(), H.detach(), log_a.detach()
            w = None if w is None else w.detach()
        return q, k, v, H, gamma, eta, w, log_a, conv

    @staticmethod
    def _beta(eta: Tensor, w: Tensor | None) -> Tensor:
        return eta[:, None] if w is None else eta[:, None] * w  # (h, 1) or (B, h, T)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B, T, _ = x.shape
        with _no_autocast(x):
            q, k, v, H, gamma, eta, w, log_a, conv = self._inputs(x, state)
            if self.faithful:
                r, H = hebbian_chunked(q, k, v, H, gamma, eta, self.temperature, self.topk, self.chunk_size, w)
            else:
                r, H = memory_chunked(q, k, v, H, log_a, self._beta(eta, w), self.rule == "delta",
                                      self.temperature, self.topk, self.chunk_size)
            r = r.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, h*d)
        return self.out(r.to(x.dtype)), {"H": H, **conv}

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B = x_t.shape[0]
        with _no_autocast(x_t):
            q, k, v, H, gamma, eta, w, log_a, conv = self._inputs(x_t.unsqueeze(1), state)
            q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, h, d)
            w = None if w is None else w[:, :, 0]  # (B, h)
            if self.faithful:
                r, H = hebbian_step(q, k, v, H, gamma, eta, self.temperature, self.topk, w)
            else:
                beta = self._beta(eta, None if w is None else w.unsqueeze(-1))[..., 0]  # (h,) or (B, h)
                r, H = memory_step(q, k, v, H, log_a[..., 0], beta, self.rule == "delta", self.temperature, self.topk)
            r = r.reshape(B, self.n_heads * self.d_head)  # (B, h*d)
        return self.out(r.to(x_t.dtype)), {"H": H, **conv}


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
        chunk_size=params.chunk_size, write_gate=params.write_gate, rule=params.rule, decay=params.decay,
        key_conv=params.key_conv,
    )


def build(params, ctx) -> HebbianMemory:
    return HebbianMemory(ctx.d_model, **hebbian_kwargs(params))
