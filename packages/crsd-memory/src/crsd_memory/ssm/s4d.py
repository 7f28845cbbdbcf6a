"""S4D: the diagonal structured state space model (Gu, Gupta, Goel and Re, 2022).

Per channel ``d`` of the (normed) input and complex mode ``n < N``, a continuous-time
``x'(t) = A x(t) + B u(t)``, ``y = 2 Re(C x) + D u`` (conjugate pairs folded into ``2 Re``)
with ``A = -exp(A_log) + i A_im``, ``B = 1``, learned ``C`` and step ``dt = exp(log_dt)``,
discretised by zero-order hold (exact for an input held over the step)::

    dA = exp(dt A)        dB = (dA - 1) / A * B

Training path: the recurrence is a causal convolution ``y = K * u + D u`` with the kernel
``K_l = 2 Re(sum_n C_n dB_n dA_n^l)`` (``l < T``), applied with FFTs in ``O(T log T)``. An
incoming state ``x0`` adds ``2 Re(sum_n C_n dA_n^(t+1) x0_n)`` at position ``t``, and the final
state is ``dA^T x0 + sum_s dA^(T-1-s) dB u_s``. ``step`` runs the recurrence for one token.
Initialisation: S4D-Lin (``A_n = -1/2 + i pi n``) or S4D-Inv, ``dt`` log-uniform in
``[dt_min, dt_max]``.

State per layer: ``ssm (B, D, N, 2)`` float32, the complex state as (real, imaginary); it is
the injectable entry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crsd_memory.ssm.common import SSMBlock, StackBackbone
from crsd_memory.ssm.reference import s4d_naive


class S4DMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 32, dt_min: float = 1e-3, dt_max: float = 0.1,
                 init: str = "lin") -> None:
        super().__init__()
        D, N = d_model, d_state
        self.d_model, self.d_state, self.impl = D, N, "fast"
        n = torch.arange(N, dtype=torch.float32)
        imag = math.pi * n if init == "lin" else N / math.pi * (N / (2 * n + 1) - 1)  # S4D-Lin / S4D-Inv
        self.A_log = nn.Parameter(torch.full((D, N), math.log(0.5)))  # real part -1/2
        self.A_im = nn.Parameter(imag.repeat(D, 1))  # (D, N)
        self.C = nn.Parameter(torch.randn(D, N, 2) * math.sqrt(0.5))  # complex, variance 1
        self.D = nn.Parameter(torch.ones(D))
        self.log_dt = nn.Parameter(torch.rand(D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        return {"ssm": torch.zeros(batch_size, self.d_model, self.d_state, 2, device=device)}

    def discrete(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(dtA, dA, dB, C)``, each complex ``(D, N)``."""
        A = torch.complex(-torch.exp(self.A_log.float()), self.A_im.float())
        dtA = A * torch.exp(self.log_dt.float())[:, None]
        dA = torch.exp(dtA)
        return dtA, dA, (dA - 1) / A, torch.view_as_complex(self.C.float())

    def forward(self, u: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        Bt, T, D = u.shape
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            x0 = torch.view_as_complex(state["ssm"].float()) if state else torch.zeros(Bt, D, self.d_state, dtype=torch.complex64, device=u.device)
            dtA, dA, dB, C = self.discrete()
            if self.impl == "naive":
                y, x = s4d_naive(u, dA, dB, C, self.D.float(), x0)
                return y, {"ssm": torch.view_as_real(x)}
            powers = torch.exp(dtA[..., None] * torch.arange(T + 1, device=u.device))  # (D, N, T+1): dA^l
            K = 2 * torch.einsum("dn,dnl->dl", C * dB, powers[..., :T]).real  # (D, T)
            n = 2 * T  # zero-padded so the circular convolution is the causal one
            y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n) * torch.fft.rfft(K, n), n)[..., :T]  # (B, D, T)
            y = y.transpose(1, 2) + self.D.float() * u  # (B, T, D)
            y = y + 2 * torch.einsum("dn,bdn,dnt->btd", C, x0, powers[..., 1:]).real  # the incoming state
            # final state: dA^T x0 + sum_s dA^(T-1-s) dB u_s
            x = powers[..., T] * x0 + dB * torch.einsum("btd,dnt->bdn", u.to(dB.dtype), powers[..., :T].flip(-1))
        return y, {"ssm": torch.view_as_real(x)}

    def step(self, u_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(u_t.device.type, enabled=False):
            u_t = u_t.float()
            _, dA, dB, C = self.discrete()
            x = dA * torch.view_as_complex(state["ssm"].float()) + dB * u_t[..., None]  # (B, D, N)
            y = 2 * (x * C).sum(-1).real + self.D.float() * u_t  # (B, D)
        return y, {"ssm": torch.view_as_real(x)}


def build(params, ctx) -> StackBackbone:
    """Factory of backbone ``s4d``: ``n_layers`` :class:`SSMBlock` of :class:`S4DMixer`."""
    D = ctx.d_model
    layers = [SSMBlock(D, S4DMixer(D, params.d_state, params.dt_min, params.dt_max, params.init), params.dropout)
              for _ in range(params.n_layers)]
    return StackBackbone(D, layers, "ssm")
