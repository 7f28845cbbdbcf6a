"""Causal depthwise convolution with an explicit state (replaces causal-conv1d).

The conv state is the last ``K - 1`` inputs seen, time-major and channel-last:
``(B, K - 1, C)``. Prepending it to the input and running an unpadded depthwise
convolution gives the same outputs as one convolution over the whole history.

``weight`` is ``(C, K)`` (the HF ``conv1d.weight`` ``(C, 1, K)`` squeezed), tap ``K - 1``
multiplies the newest input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """``x (B, T, C)``, ``conv_state (B, K-1, C)`` -> ``(y (B, T, C), new_state (B, K-1, C))``.

    No activation is applied. ``new_state`` keeps the dtype of ``conv_state``.
    """
    K = weight.shape[-1]
    xs = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    y = F.conv1d(xs.transpose(1, 2), weight.unsqueeze(1).to(x.dtype), bias, groups=weight.shape[0])  # (B, C, T)
    new_state = xs[:, xs.shape[1] - (K - 1):].to(conv_state.dtype)  # (B, K-1, C)
    return y.transpose(1, 2), new_state


def causal_conv_step(x_t: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: ``x_t (B, C)`` -> ``(y_t (B, C), new_state (B, K-1, C))`` in O(K C)."""
    window = torch.cat([conv_state.to(x_t.dtype), x_t.unsqueeze(1)], dim=1)  # (B, K, C)
    y = torch.einsum("bkc,ck->bc", window, weight.to(x_t.dtype))
    if bias is not None:
        y = y + bias.to(x_t.dtype)
    return y, window[:, 1:].to(conv_state.dtype)
