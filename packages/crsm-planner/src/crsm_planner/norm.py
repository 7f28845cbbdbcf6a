"""RMSNorm and the gated RMSNorm of Mamba-2 (parameter ``weight``, as in HuggingFace)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dimension, computed in fp32 (HF ``MambaRMSNorm``).

    The result has the weight's dtype, so a bf16 model gets bf16 out of an fp32 residual stream.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: ``weight * rmsnorm(x * silu(z))``, the RMS taken per group of
    ``group_size`` channels (mamba-ssm's ``RMSNormGated`` with ``norm_before_gate=False``).

    With one group this is HF's ``MambaRMSNormGated``; HF normalises over all channels even
    when ``n_groups > 1``, so HF checkpoints with several groups differ from mamba-ssm's
    definition, which is the one used here.
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.group_size = group_size or d

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        xf = x.float() * F.silu(z.float())
        shape = xf.shape
        xg = xf.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)  # (..., G, d/G)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xg.view(shape).to(self.weight.dtype)
