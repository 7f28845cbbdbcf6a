"""The wrapper shared by the `hebbian` and `episodic` memories.

``h_out = h + g * recall`` with ``recall = core(LayerNorm(h))`` and a per-channel gate
``g = sigmoid(W_g LayerNorm(h))``. Publishes ``memory.recall`` and ``memory.gate``. The
state is the core's (see hebbian.py and episodic.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Memory, State
from statelab.internals import publish


class GatedRecallMemory(Memory):
    def __init__(self, d_model: int, core: nn.Module) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.core = core
        self.gate = nn.Linear(d_model, d_model)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.core.init_state(batch_size, device)

    def _out(self, h: Tensor, x: Tensor, r: Tensor) -> tuple[Tensor, Aux]:
        aux: Aux = {}
        r = publish(aux, "memory.recall", r)
        g = publish(aux, "memory.gate", torch.sigmoid(self.gate(x)))
        return h + g * r, aux

    def forward(self, h: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        x = self.norm(h)  # (B, T, D)
        r, s = self.core(x, state)
        y, aux = self._out(h, x, r)
        return y, s, aux

    def step(self, h_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        x = self.norm(h_t)  # (B, D)
        r, s = self.core.step(x, state)
        y, aux = self._out(h_t, x, r)
        return y, s, aux
