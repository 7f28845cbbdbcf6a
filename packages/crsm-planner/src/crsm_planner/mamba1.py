"""The Mamba-1 mixer (selective SSM) and its pure-PyTorch scan.

Parameter names and shapes match HuggingFace ``transformers``' ``MambaMixer``::

    in_proj   Linear(d_model, 2 * d_inner)          x and the gate z
    conv1d    Conv1d(d_inner, d_inner, d_conv, groups=d_inner)   (only its weights are used)
    x_proj    Linear(d_inner, dt_rank + 2 * d_state, bias=False)  dt, B, C from x
    dt_proj   Linear(dt_rank, d_inner)
    A_log     (d_inner, d_state)                     A = -exp(A_log)
    D         (d_inner,)
    out_proj  Linear(d_inner, d_model)

State: ``conv (B, d_conv - 1, d_inner)`` (the last inputs of the convolution) and
``ssm (B, d_inner, d_state)``, both fp32.

The scan
--------
Autograd through a per-step loop stores every intermediate and is slow; autograd through
a vectorised reference (mamba-ssm's ``selective_scan_ref``) materialises several
``(B, T, d_inner, d_state)`` tensors per op. :class:`SelectiveScan` is a custom
autograd function instead: time is cut into chunks of ``SCAN_CHUNK`` steps; inside a
chunk the discretised ``exp(dt A)`` and ``dt B u`` are built at once (a few MB, cache
resident) and the recurrence is one fused ``addcmul`` per step. Only the states at chunk
boundaries are saved; the backward recomputes each chunk's states and runs the adjoint
recurrence ``G_t = dy_t C_t + exp(dt_{t+1} A) G_{t+1}`` the same way, then turns ``G``
into the gradients of ``u, dt, A, B, C`` and the initial state with a few batched
reductions. See benchmarks/crsm/mamba_throughput.py for the timings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crsm_planner import kernels
from crsm_planner.conv import causal_conv, causal_conv_step
from crsm_planner.naive import selective_scan_naive

SCAN_CHUNK = 16  # time steps per chunk of the pure-PyTorch scan (cache-sized blocks)


class SelectiveScan(torch.autograd.Function):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t . h_t`` (no D, no gate).

    Inputs ``u, dt (Bt, T, Di)``, ``A (Di, N)``, ``B, C (Bt, T, N)``, ``h0 (Bt, Di, N)``,
    all fp32. Returns ``y (Bt, T, Di)`` and ``h_T (Bt, Di, N)``; both are differentiable.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk):
        u_t = u.transpose(0, 1).contiguous()  # (T, Bt, Di): time-major, so [t] is contiguous
        dt_t = dt.transpose(0, 1).contiguous()  # (T, Bt, Di)
        B_t = B.transpose(0, 1).contiguous()  # (T, Bt, N)
        C_t = C.transpose(0, 1).contiguous()  # (T, Bt, N)
        T = u_t.shape[0]
        y = torch.empty_like(u_t)  # (T, Bt, Di)
        h = h0
        starts = []
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            starts.append(h)
            Hc = _chunk_states(h, u_t[t0:t1], dt_t[t0:t1], A, B_t[t0:t1])  # (L, Bt, Di, N)
            y[t0:t1] = (Hc * C_t[t0:t1].unsqueeze(2)).sum(-1)  # (L, Bt, Di); faster than a bmm with N-long rows
            h = Hc[-1].clone()
        ctx.chunk = chunk
        ctx.save_for_backward(u_t, dt_t, A, B_t, C_t, torch.stack(starts))
        return y.transpose(0, 1), h

    @staticmethod
    def backward(ctx, gy, gh):
        u_t, dt_t, A, B_t, C_t, starts = ctx.saved_tensors
        chunk = ctx.chunk
        T, Bt, Di = u_t.shape
        N = A.shape[1]
        gy_t = gy.transpose(0, 1).contiguous()  # (T, Bt, Di)
        du = torch.empty_like(u_t)
        ddt = torch.empty_like(dt_t)
        dB = torch.empty_like(B_t)
        dC = torch.empty_like(C_t)
        dA = torch.zeros_like(A)
        # R: gradient reaching h_t from everything after step t (starts as dL/dh_T)
        R = gh.clone() if gh is not None else torch.zeros(Bt, Di, N, dtype=u_t.dtype, device=u_t.device)
        chunks = list(range(0, T, chunk))
        for c in reversed(range(len(chunks))):
            t0 = chunks[c]
            t1 = min(t0 + chunk, T)
            h_start = starts[c]  # (Bt, Di, N)
            u_c, dt_c, B_c, C_c, gy_c = u_t[t0:t1], dt_t[t0:t1], B_t[t0:t1], C_t[t0:t1], gy_t[t0:t1]
            L = t1 - t0
            dA_c = torch.exp(dt_c.unsqueeze(-1) * A)  # (L, Bt, Di, N)
            Hc = _chunk_states(h_start, u_c, dt_c, A, B_c, dA_c)  # (L, Bt, Di, N)
            dC[t0:t1] = torch.bmm(gy_c.reshape(L * Bt, 1, Di), Hc.view(L * Bt, Di, N)).view(L, Bt, N)
            G = gy_c.unsqueeze(-1) * C_c.unsqueeze(2)  # (L, Bt, Di, N): dy_t C_t, becomes dL/dh_t
            G[L - 1].add_(R)
            for i in range(L - 2, -1, -1):
                G[i].addcmul_(G[i + 1], dA_c[i + 1])
            R = G[0] * dA_c[0]
            # dL/d(dt A) at each step: G_t * h_{t-1} * exp(dt_t A)
            GdA = G * dA_c  # (L, Bt, Di, N)
            GdA[1:].mul_(Hc[:-1])
            GdA[0].mul_(h_start)
            dA.add_((GdA * dt_c.unsqueeze(-1)).sum((0, 1)))
            g_dtu = (G * B_c.unsqueeze(2)).sum(-1)  # (L, Bt, Di): dL/d(dt u)
            dB[t0:t1] = torch.bmm((dt_c * u_c).reshape(L * Bt, 1, Di), G.view(L * Bt, Di, N)).view(L, Bt, N)
            du[t0:t1] = g_dtu * dt_c
            ddt[t0:t1] = g_dtu * u_c + (GdA * A).sum(-1)  # exp(dt A) -> dt
        return du.transpose(0, 1), ddt.transpose(0, 1), dA, dB.transpose(0, 1), dC.transpose(0, 1), R, None


def _chunk_states(h: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, dA: Tensor | None = None) -> Tensor:
    """States ``h_t`` for one time-major chunk: ``u, dt (L, Bt, Di)``, ``B (L, Bt, N)`` -> ``(L, Bt, Di, N)``."""
    if dA is None:
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (L, Bt, Di, N)
    H = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # (L, Bt, Di, N): dt u B, overwritten by the states
    H[0].addcmul_(dA[0], h)
    for i in range(1, H.shape[0]):
        H[i].addcmul_(dA[i], H[i - 1])
    return H


def selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor,
                   chunk: int = SCAN_CHUNK) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch selective scan with the same contract as :func:`~crsm_planner.naive.selective_scan_naive`
    (``h0`` required, fp32 inside). Returns ``y (Bt, T, Di)`` fp32 and ``h_T (Bt, Di, N)``."""
    y, h = SelectiveScan.apply(u.float(), dt.float(), A.float(), B.float(), C.float(), h0.float(), chunk)
    if D is not None:
        y = y + D.float() * u.float()
    return y, h


def selective_step(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
    """One step: ``u, dt (Bt, Di)``, ``B, C (Bt, N)``, ``h (Bt, Di, N)`` -> ``y (Bt, Di)``, new ``h``."""
    u, dt = u.float(), dt.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (Bt, Di, N)
    h = dA * h + (dt * u).unsqueeze(-1) * B.float().unsqueeze(1)
    y = torch.bmm(h, C.float().unsqueeze(-1)).squeeze(-1)  # (Bt, Di)
    if D is not None:
        y = y + D.float() * u
    return y, h


class Mamba1Mixer(nn.Module):
    """Selective SSM mixer: ``(B, T, d_model) -> (B, T, d_model)`` with state ``conv``, ``ssm``."""

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, use_kernels: str = "auto") -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.use_kernels = use_kernels
        self.impl = "auto"  # "auto" | "torch" | "naive" | "kernels"; see MambaBackbone.set_impl
        Di, N = self.d_inner, d_state
        self.in_proj = nn.Linear(d_model, 2 * Di, bias=bias)
        self.conv1d = nn.Conv1d(Di, Di, d_conv, groups=Di, bias=conv_bias, padding=d_conv - 1)
        self.x_proj = nn.Linear(Di, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, Di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Di, 1))  # (Di, N), S4D-real
        self.D = nn.Parameter(torch.ones(Di))
        self.out_proj = nn.Linear(Di, d_model, bias=bias)
        # time-step init (Mamba paper): dt log-uniform in [dt_min, dt_max], stored as softplus^-1 in the bias
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(Di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=torch.float32),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        }

    def _path(self, x: Tensor, op: str) -> str:
        if self.impl != "auto":
            return self.impl
        return "kernels" if kernels.wanted(self.use_kernels, x, (op,)) else "torch"

    def _ssm_inputs(self, dbc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """From ``x_proj(xs) (..., R + 2N)``: ``dt`` (after softplus, fp32), ``A``, ``B``, ``C``."""
        dt_r, Bm, Cm = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt_r.float(), self.dt_proj.weight.float(), self.dt_proj.bias.float()))  # (..., Di)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        return dt, A, Bm.float(), Cm.float()

    def forward(self, x: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``state = None`` means the zero state."""
        Bt = x.shape[0]
        if state is None:
            conv0, h0 = torch.zeros(Bt, self.d_conv - 1, self.d_inner, device=x.device), None
        else:
            conv0, h0 = state["conv"], state["ssm"]
        xz = self.in_proj(x)  # (B, T, 2 Di)
        xs, z = xz.chunk(2, dim=-1)  # (B, T, Di) each
        xs, conv_state = causal_conv(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv0)
        xs = F.silu(xs)
        path = self._path(x, "selective_scan_fn")
        dbc = self.x_proj(xs)  # (B, T, R + 2N), in the compute dtype
        with torch.autocast(x.device.type, enabled=False):
            dt, A, Bm, Cm = self._ssm_inputs(dbc)
            if path == "kernels":
                if h0 is not None and not bool(h0.any()):  # zero state: skip the linearity correction
                    h0 = None
                y, h = kernels.mamba1_scan(xs.float(), dt, A, Bm, Cm, self.D.float(), h0)
            else:
                if h0 is None:
                    h0 = torch.zeros(Bt, self.d_inner, self.d_state, device=x.device)
                scan = selective_scan_naive if path == "naive" else selective_scan
                y, h = scan(xs, dt, A, Bm, Cm, self.D, h0)
            y = y * F.silu(z.float())  # (B, T, Di)
        out = self.out_proj(y.to(x.dtype))
        return out, {"conv": conv_state, "ssm": h}

    def step(self, x_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        xz = self.in_proj(x_t)  # (B, 2 Di)
        xs, z = xz.chunk(2, dim=-1)
        xs, conv_state = causal_conv_step(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, state["conv"])
        xs = F.silu(xs)
        path = self._path(x_t, "selective_state_update")
        dbc = self.x_proj(xs)  # (B, R + 2N)
        with torch.autocast(x_t.device.type, enabled=False):
            dt, A, Bm, Cm = self._ssm_inputs(dbc)
            if path == "kernels":
                y, h = kernels.mamba1_step(xs.float(), dt, A, Bm, Cm, self.D.float(), state["ssm"])
            else:
                y, h = selective_step(xs, dt, A, Bm, Cm, self.D, state["ssm"].float())
            y = y * F.silu(z.float())
        return self.out_proj(y.to(x_t.dtype)), {"conv": conv_state, "ssm": h}
