"""The sliding-window mean memory.

    recall_t = W · mean(h_{t-w+1}, ..., h_t)        h_out_t = h_t + recall_t

State: ``{"buf": (B, w - 1, D)}``, the last ``w - 1`` inputs (zeros before the start, so
the mean always divides by ``w``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab import Memory, publish


class WindowMean(Memory):
    def __init__(self, d_model: int, window: int) -> None:
        super().__init__()
        self.d_model, self.window = d_model, window
        self.proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.proj.bias)

    def init_state(self, batch_size, device=None, dtype=None):
        return {"buf": torch.zeros(batch_size, self.window - 1, self.d_model, device=device)}

    def forward(self, h: Tensor, state=None):
        B, T, D = h.shape
        buf = state["buf"] if state else torch.zeros(B, self.window - 1, D, device=h.device)
        x = torch.cat([buf.to(h.dtype), h], 1)  # (B, w-1+T, D)
        # running window sums through a cumulative sum: S_t - S_{t-w}
        c = F.pad(x.cumsum(1), (0, 0, 1, 0))  # (B, w+T, D)
        mean = (c[:, self.window :] - c[:, :T]) / self.window  # (B, T, D)
        aux = {}
        recall = publish(aux, "memory.recall", self.proj(mean))
        return h + recall, {"buf": x[:, x.shape[1] - (self.window - 1) :]}, aux


def build(params, ctx) -> WindowMean:
    return WindowMean(ctx.d_model, params.window)
