"""CRSD backbone: Contextual Recurrent Spectral Dual-memory cells stacked into layers.

Config (``CRSDParams`` in plugin.py): ``n_layers``, ``d_reservoir``, ``reservoir_tau_min``/
``reservoir_tau_max``, ``spectral``, ``memory``, ``memory_layers``, ``reservoir``, ``chunk_size``
and the ``hebbian`` / ``episodic`` sub-configs of each cell's dual memory. ``memory``,
``spectral`` and ``reservoir`` are the ablation switches: each removes its pathway (and its
parameters and state) from every cell.

One cell, for an input x_t (B, D)::

    x~    = LayerNorm(x_t)
    r_t   = DualRecall(x~)                               dual memory (dual.py), keyed by the input
    rho_t = lam * rho_{t-1} + (1 - lam) * P x~           fixed leaky reservoir: untrained P, time
                                                          constants log-spaced in [tau_min, tau_max]
    u_t   = W_u x~ + W_rho rho_t + W_m r_t               candidate state
    g_t   = sigmoid(W_g r_t)                             recall gates the update ("crsd.update_gate")
    a_t   = exp(-softplus(W_dt x~) * g_t * exp(A_log))   continuous-time step: dh/dt = (u - h) / tau
    h_t   = a_t * h_{t-1} + (1 - a_t) * u_t              (exact zero-order-hold discretisation)
    y_t   = x_t + Spectral(h_t) * silu(W_z x~)
    Spectral(h) = Linear(irfft(F * rfft(LayerNorm(h))))  orthonormal FFT over the features with a
                                                          learned per-frequency filter F (init 1)

Nothing depends nonlinearly on the previous hidden state, so the offline forward runs the
two recurrences (rho and h) as parallel prefix scans, ``chunk_size`` tokens at a time (each
chunk starts from the previous chunk's last state, so a scan's work and memory are
O(T log2 chunk_size) instead of O(T log2 T)), and the memory in its chunked form; ``step``
runs the same equations for one token.

The spectral sub-block adds no expressive power: rfft -> per-frequency filter -> irfft is a
fixed-size linear map of the features (a circulant matrix C), so Linear(C s) = (W C) s is
one D x D linear map, which ``out`` alone can already represent. It is kept, default on as
in the seed, as a reparameterisation (orthonormal at init, a filter that trains per
frequency) whose only possible effect is on optimisation; ``spectral: false`` is the fold
(LayerNorm, then ``out``), and the ablation in docs/plugins/crsd-memory.md measures
whether the reparameterisation helps. Without the
memory (``memory: false``, or a layer not in ``memory_layers``) the gate reads ``x~``.

State per layer: ``h`` (B, D), ``rho`` (B, d_reservoir) (absent with ``reservoir: false``)
and the dual memory's entries
(``hebb_H``, ``epi_keys``, ``epi_values``, ``epi_prio``, ``epi_slot_t``, ``epi_t``), all
batch-first and saved as-is by safetensors. ``layers.<i>.h`` are injectable (planners).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Layer, State
from statelab.internals import publish

from crsd_memory.dual import DualRecall, _pre, _unpre
from crsd_memory.episodic import episodic_kwargs
from crsd_memory.hebbian import hebbian_kwargs


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """``h_t = a_t * h_{t-1} + b_t`` for all t at once (Hillis-Steele prefix scan, log2(T)
    steps of elementwise work). ``a`` broadcastable to ``b`` (B, T, D); ``h0`` (B, D).
    Returns ``(h (B, T, D), h_T (B, D))``; reference: :func:`crsd_memory.reference.linear_recurrence`."""
    A = a.expand_as(b)
    Bv = torch.cat([A[:, :1] * h0.unsqueeze(1) + b[:, :1], b[:, 1:]], dim=1)  # fold h0 into the first term
    T, k = b.shape[1], 1
    while k < T:
        # combine every element with the one k steps earlier: (A', B') = (A A_prev, A B_prev + B)
        Bv = torch.cat([Bv[:, :k], A[:, k:] * Bv[:, :-k] + Bv[:, k:]], dim=1)
        A = torch.cat([A[:, :k], A[:, k:] * A[:, :-k]], dim=1)
        k *= 2
    return Bv, Bv[:, -1]


def chunked_scan(a: Tensor, b: Tensor, h0: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """:func:`linear_scan` ``chunk_size`` tokens at a time, each chunk from the previous one's
    last state. Same arguments and results."""
    A = a.expand_as(b)
    hs = []
    for c0 in range(0, b.shape[1], chunk_size):
        h, h0 = linear_scan(A[:, c0 : c0 + chunk_size], b[:, c0 : c0 + chunk_size], h0)
        hs.append(h)
    return torch.cat(hs, dim=1), h0


class CRSDLayer(Layer):
    def __init__(
        self,
        d_model: int,
        d_reservoir: int = 64,
        tau_min: float = 1.0,
        tau_max: float = 256.0,
        spectral: bool = True,
        memory: dict | None = None,
        reservoir: bool = True,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        D, R = d_model, d_reservoir
        self.d_model, self.d_reservoir, self.spectral = D, R, spectral
        self.reservoir, self.chunk_size = reservoir, chunk_size
        self.norm = nn.LayerNorm(D)
        self.memory = DualRecall(D, D, **memory) if memory is not None else None
        if reservoir:
            # the reservoir is fixed (buffers, not parameters): leaky integrators over a random projection
            tau = torch.logspace(math.log10(tau_min), math.log10(tau_max), R)
            self.register_buffer("res_decay", torch.exp(-1.0 / tau))  # (R,)
            self.register_buffer("res_in", torch.randn(R, D) / math.sqrt(D))  # (R, D)
            self.w_rho = nn.Linear(R, D, bias=False)
        self.w_u = nn.Linear(D, D)
        self.w_mem = nn.Linear(D, D, bias=False) if self.memory is not None else None
        self.w_gate = nn.Linear(D, D)
        self.w_dt = nn.Linear(D, D)
        self.w_z = nn.Linear(D, D)
        self.A_log = nn.Parameter(torch.zeros(D))
        with torch.no_grad():  # step sizes log-uniform in [1e-3, 1]: time constants from ~1 to ~1000 tokens
            dt = torch.exp(torch.empty(D).uniform_(math.log(1e-3), math.log(1.0)))
            self.w_dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.w_dt.weight.mul_(0.1)
        self.spec_norm = nn.LayerNorm(D)
        if spectral:
            self.spec_filter = nn.Parameter(torch.stack([torch.ones(D // 2 + 1), torch.zeros(D // 2 + 1)], -1))
        self.out = nn.Linear(D, D)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        state = {"h": torch.zeros(batch_size, self.d_model, device=device)}
        if self.reservoir:
            state["rho"] = torch.zeros(batch_size, self.d_reservoir, device=device)
        if self.memory is not None:
            state.update(_pre("mem", self.memory.init_state(batch_size, device)))
        return state

    def _mix(self, h: Tensor) -> Tensor:
        """The spectral sub-block over the last (feature) dim, in fp32 (without ``spectral``, its
        fold: LayerNorm then the Linear)."""
        if not self.spectral:
            return self.out(self.spec_norm(h))
        with torch.autocast(device_type=h.device.type, enabled=False):
            s = self.spec_norm(h.float())  # (..., D)
            f = torch.fft.rfft(s, dim=-1, norm="ortho")  # (..., D//2+1) complex
            f = f * torch.view_as_complex(self.spec_filter.float())
            s = torch.fft.irfft(f, n=self.d_model, dim=-1, norm="ortho")  # (..., D)
            return self.out(s)

    def _gates(self, xn: Tensor, r: Tensor | None, aux: Aux) -> tuple[Tensor, Tensor]:
        """Decay ``a`` and input ``(1 - a) u`` of the hidden recurrence (fp32), for any leading dims."""
        u = self.w_u(xn)  # (..., D)
        g_in = xn if r is None else r
        if r is not None:
            u = u + self.w_mem(r)
        g = publish(aux, "crsd.update_gate", torch.sigmoid(self.w_gate(g_in)))  # (..., D)
        dt = F.softplus(self.w_dt(xn))
        a = torch.exp(-dt.float() * g.float() * torch.exp(self.A_log.float()))  # (..., D) in (0, 1]
        return a, u.float()

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        B, T, D = x.shape
        state = state or self.init_state(B, x.device)
        aux: Aux = {}
        xn = self.norm(x)  # (B, T, D)
        r, new = None, {}
        if self.memory is not None:
            r, ms = self.memory(xn, _unpre("mem", state), aux)  # (B, T, D)
            new.update(_pre("mem", ms))
        a, u = self._gates(xn, r, aux)
        if self.reservoir:
            lam = self.res_decay  # (R,)
            rho, new["rho"] = chunked_scan(lam, (1 - lam) * (xn.float() @ self.res_in.T), state["rho"],
                                           self.chunk_size)  # (B, T, R)
            u = u + self.w_rho(rho.to(xn.dtype)).float()
        h, new["h"] = chunked_scan(a, (1 - a) * u, state["h"], self.chunk_size)  # (B, T, D)
        y = self._mix(h).to(x.dtype) * F.silu(self.w_z(xn))
        return x + y, new, aux

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        B, D = x_t.shape
        state = state or self.init_state(B, x_t.device)
        aux: Aux = {}
        xn = self.norm(x_t)  # (B, D)
        r, new = None, {}
        if self.memory is not None:
            r, ms = self.memory.step(xn, _unpre("mem", state), aux)  # (B, D)
            new.update(_pre("mem", ms))
        a, u = self._gates(xn, r, aux)
        if self.reservoir:
            lam = self.res_decay
            new["rho"] = lam * state["rho"] + (1 - lam) * (xn.float() @ self.res_in.T)  # (B, R)
            u = u + self.w_rho(new["rho"].to(xn.dtype)).float()
        new["h"] = h = a * state["h"] + (1 - a) * u  # (B, D)
        y = self._mix(h).to(x_t.dtype) * F.silu(self.w_z(xn))
        return x_t + y, new, aux


class CRSD(Backbone):
    def __init__(self, d_model: int, params) -> None:
        super().__init__(d_model)
        mem = None
        if params.memory:
            mem = {"hebbian": hebbian_kwargs(params.hebbian), "episodic": episodic_kwargs(params.episodic)}
        with_mem = set(range(params.n_layers) if params.memory_layers is None else params.memory_layers)
        self.layers = nn.ModuleList(
            [
                CRSDLayer(
                    d_model, params.d_reservoir, params.reservoir_tau_min, params.reservoir_tau_max, params.spectral,
                    mem if i in with_mem else None, params.reservoir, params.chunk_size,
                )
                for i in range(params.n_layers)
            ]
        )
        self.final_norm = nn.LayerNorm(d_model)

    def injectable_keys(self) -> list[str]:
        return [f"layers.{i}.h" for i in range(self.n_layers)]


def build(params, ctx) -> CRSD:
    return CRSD(ctx.d_model, params)
