"""What the SSM backbones share: the residual block around a sequence mixer and the stack.

A *mixer* maps ``u (B, T, D) -> y (B, T, D)`` with a state dict (``init_state``,
``forward(u, state) -> (y, state)``, ``step(u_t, state) -> (y_t, state)``) and an ``impl``
attribute: ``"fast"`` (the parallel path) or ``"naive"`` (the sequential reference).

    SSMBlock(x) = x + dropout(GLU(Linear(GELU(mixer(LayerNorm(x))))))

is the S4D/S5/LinOSS block of those papers (pre-norm, GELU, then a GLU output projection).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Layer, State

IMPLS = ("fast", "naive")


class SSMBlock(Layer):
    """Pre-norm residual block around one mixer; its state is the mixer's."""

    def __init__(self, d_model: int, mixer: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.out = nn.Linear(d_model, 2 * d_model)
        self.drop = nn.Dropout(dropout)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.mixer.init_state(batch_size, device)

    def _post(self, y: Tensor) -> Tensor:
        return self.drop(F.glu(self.out(F.gelu(y)), dim=-1))

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new = self.mixer(self.norm(x), state or None)  # (B, T, D)
        return x + self._post(y.to(x.dtype)), new, {}

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        state = state or self.mixer.init_state(x_t.shape[0], x_t.device)
        y, new = self.mixer.step(self.norm(x_t), state)  # (B, D)
        return x_t + self._post(y.to(x_t.dtype)), new, {}


class StackBackbone(Backbone):
    """``layers`` then a final LayerNorm; the state entries named ``steer_key`` are injectable."""

    def __init__(self, d_model: int, layers: list[Layer], steer_key: str | None) -> None:
        super().__init__(d_model)
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(d_model)
        self.steer_key = steer_key

    def injectable_keys(self) -> list[str]:
        if self.steer_key is None:
            return []
        return [f"layers.{i}.{self.steer_key}" for i, layer in enumerate(self.layers)
                if self.steer_key in layer.init_state(1)]

    def set_impl(self, impl: str) -> "StackBackbone":
        """Run every mixer through ``"fast"`` (default) or ``"naive"`` (sequential reference)."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for m in self.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        return self
