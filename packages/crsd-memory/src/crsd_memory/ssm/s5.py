"""S5: the simplified state space layer (Smith, Warrington and Linderman, 2023).

One multi-input multi-output SSM per layer instead of S4's bank of single-input ones: a
diagonal complex state ``x (P/2,)`` shared by all ``H = d_model`` channels::

    x_t = dA * x_{t-1} + dB u_t        dA = exp(Lambda dt),  dB = (dA - 1) / Lambda * B    (ZOH)
    y_t = 2 Re(C x_t) + D * u_t        B (P/2, H), C (H, P/2) complex, D (H,)

``Lambda`` starts at the eigenvalues of the normal part of HiPPO-LegS (HiPPO-N: ``-1/2`` plus
the eigenvalues of a skew-symmetric matrix), of which the ``P/2`` with non-negative imaginary
part are kept and the conjugates folded into ``2 Re``; ``dt`` is learned per state, log-uniform
in ``[dt_min, dt_max]`` at init. ``B`` and ``C`` start as random complex matrices (the paper
draws real ones and multiplies by the eigenvectors, a unitary change of basis that leaves
them random with the same variance).

The forward pass runs the recurrence as a parallel associative scan
(:mod:`crsd_memory.ssm.scan`) over the pairs ``(dA, dB u_t)``, ``chunk_size`` tokens at a
time; ``step`` runs one token. State per layer: ``ssm (B, P/2, 2)`` float32, the complex
state as (real, imaginary); it is the injectable entry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crsd_memory.ssm.common import SSMBlock, StackBackbone
from crsd_memory.ssm.reference import s5_naive
from crsd_memory.ssm.scan import associative_scan, diagonal


def hippo_n_eigenvalues(P: int) -> Tensor:
    """The ``P/2`` eigenvalues with non-negative imaginary part of HiPPO-N (size ``P``), complex64."""
    n = torch.arange(P, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    skew = 0.5 * r[:, None] * r[None, :]
    skew = torch.tril(skew, -1) * -1 + torch.triu(skew, 1)  # -1/2 sqrt((2n+1)(2k+1)) below, + above
    imag = torch.linalg.eigvalsh(1j * skew.to(torch.complex128)).real  # eigenvalues of skew are i * these
    imag = torch.sort(imag[imag >= 0]).values[: P // 2]
    if imag.numel() < P // 2:  # an odd count of zero eigenvalues; pad with the smallest
        imag = torch.cat([imag.new_zeros(P // 2 - imag.numel()), imag])
    return torch.complex(torch.full_like(imag, -0.5), imag).to(torch.complex64)


class S5Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 chunk_size: int = 64) -> None:
        super().__init__()
        H, P2 = d_model, d_state // 2
        self.d_model, self.n_modes, self.chunk_size, self.impl = H, P2, chunk_size, "fast"
        lam = hippo_n_eigenvalues(d_state)
        self.Lambda_re_log = nn.Parameter(torch.log(-lam.real))  # real part -exp(.) < 0: stable
        self.Lambda_im = nn.Parameter(lam.imag.clone())
        self.B = nn.Parameter(torch.randn(P2, H, 2) * math.sqrt(0.5 / H))  # complex, variance 1/H
        self.C = nn.Parameter(torch.randn(H, P2, 2) * math.sqrt(0.5 / P2))  # complex, variance 1/P2
        self.D = nn.Parameter(torch.randn(H))
        self.log_dt = nn.Parameter(torch.rand(P2) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        return {"ssm": torch.zeros(batch_size, self.n_modes, 2, device=device)}

    def discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(dA (P/2,), dB (P/2, H), C (H, P/2))``, complex."""
        lam = torch.complex(-torch.exp(self.Lambda_re_log.float()), self.Lambda_im.float())
        dA = torch.exp(lam * torch.exp(self.log_dt.float()))
        dB = ((dA - 1) / lam)[:, None] * torch.view_as_complex(self.B.float())
        return dA, dB, torch.view_as_complex(self.C.float())

    def forward(self, u: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        Bt, T, _ = u.shape
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            x0 = (torch.view_as_complex(state["ssm"].float()) if state
                  else torch.zeros(Bt, self.n_modes, dtype=torch.complex64, device=u.device))
            dA, dB, C = self.discrete()
            if self.impl == "naive":
                y, x = s5_naive(u, dA, dB, C, self.D.float(), x0)
                return y, {"ssm": torch.view_as_real(x)}
            bu = u.to(dB.dtype) @ dB.T  # (B, T, P/2)
            xs, x = associative_scan(dA.expand_as(bu), bu, x0, self.chunk_size, diagonal, diagonal)
            y = 2 * (xs @ C.T).real + self.D.float() * u  # (B, T, H)
        return y, {"ssm": torch.view_as_real(x)}

    def step(self, u_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(u_t.device.type, enabled=False):
            u_t = u_t.float()
            dA, dB, C = self.discrete()
            x = dA * torch.view_as_complex(state["ssm"].float()) + u_t.to(dB.dtype) @ dB.T  # (B, P/2)
            y = 2 * (x @ C.T).real + self.D.float() * u_t
        return y, {"ssm": torch.view_as_real(x)}


def build(params, ctx) -> StackBackbone:
    """Factory of backbone ``s5``: ``n_layers`` :class:`SSMBlock` of :class:`S5Mixer`."""
    D = ctx.d_model
    layers = [SSMBlock(D, S5Mixer(D, params.d_state, params.dt_min, params.dt_max, params.chunk_size), params.dropout)
              for _ in range(params.n_layers)]
    return StackBackbone(D, layers, "ssm")
