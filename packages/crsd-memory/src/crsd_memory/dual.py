"""Dual memory: a Hebbian matrix and an episodic buffer queried together, merged by a gate.

Config (``DualParams`` in plugin.py): ``hebbian`` and ``episodic`` sub-configs.

Both memories read the same LayerNorm'd input with their own unit-norm queries and keys
(see hebbian.py and episodic.py); their recalls are merged per channel by a learned gate
``g = sigmoid(W_g x)``::

    recall = g * r_hebbian + (1 - g) * r_episodic

:class:`DualRecall` is also the memory inside each CRSD cell (crsd.py). It publishes
``memory.gate`` (g), ``memory.hebbian_norm`` and ``memory.episodic_norm`` (per-token recall
norms) and ``memory.recall`` (the merged recall, which an intervention can force).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Memory, State
from statelab.internals import publish

from crsd_memory.episodic import EpisodicRecall, episodic_kwargs
from crsd_memory.hebbian import HebbianRecall, hebbian_kwargs


def _pre(prefix: str, state: State) -> State:
    """``{"H": t}`` -> ``{"hebb_H": t}`` (state keys stay dot-free)."""
    return {f"{prefix}_{k}": v for k, v in state.items()}


def _unpre(prefix: str, state: State) -> State:
    p = prefix + "_"
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def _norm(x: Tensor) -> Tensor:
    return (x.float().pow(2).sum(-1) + 1e-12).sqrt()  # safe at zero (no NaN gradient)


class DualRecall(nn.Module):
    """``x (B, T, d_in) -> merged recall (B, T, d_out)``; state ``hebb_*`` and ``epi_*`` entries."""

    def __init__(self, d_in: int, d_out: int, hebbian: dict | None = None, episodic: dict | None = None) -> None:
        super().__init__()
        self.hebbian = HebbianRecall(d_in, d_out, **(hebbian or {}))
        self.episodic = EpisodicRecall(d_in, d_out, **(episodic or {}))
        self.merge = nn.Linear(d_in, d_out)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return {
            **_pre("hebb", self.hebbian.init_state(batch_size, device)),
            **_pre("epi", self.episodic.init_state(batch_size, device)),
        }

    @staticmethod
    def _split(state: State | None) -> tuple[State | None, State | None]:
        if not state:
            return None, None
        return _unpre("hebb", state), _unpre("epi", state)

    def _merge(self, x: Tensor, rh: Tensor, re: Tensor, aux: Aux) -> Tensor:
        g = publish(aux, "memory.gate", torch.sigmoid(self.merge(x)))
        publish(aux, "memory.hebbian_norm", _norm(rh))
        publish(aux, "memory.episodic_norm", _norm(re))
        return publish(aux, "memory.recall", g * rh + (1 - g) * re)

    def forward(self, x: Tensor, state: State | None, aux: Aux) -> tuple[Tensor, State]:
        sh, se = self._split(state)
        rh, sh = self.hebbian(x, sh)  # (B, T, d_out)
        re, se = self.episodic(x, se)  # (B, T, d_out)
        return self._merge(x, rh, re, aux), {**_pre("hebb", sh), **_pre("epi", se)}

    def step(self, x_t: Tensor, state: State | None, aux: Aux) -> tuple[Tensor, State]:
        sh, se = self._split(state)
        rh, sh = self.hebbian.step(x_t, sh)  # (B, d_out)
        re, se = self.episodic.step(x_t, se)  # (B, d_out)
        return self._merge(x_t, rh, re, aux), {**_pre("hebb", sh), **_pre("epi", se)}


class DualMemory(Memory):
    """``h_out = h + recall`` with ``recall = DualRecall(LayerNorm(h))`` (the merge gate is the
    memory's gate). State: ``hebb_H`` and ``epi_keys``, ``epi_values``, ``epi_prio``,
    ``epi_slot_t``, ``epi_t`` (see hebbian.py and episodic.py)."""

    def __init__(self, d_model: int, hebbian: dict | None = None, episodic: dict | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.core = DualRecall(d_model, d_model, hebbian, episodic)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.core.init_state(batch_size, device)

    def forward(self, h: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        aux: Aux = {}
        r, s = self.core(self.norm(h), state, aux)  # (B, T, D)
        return h + r, s, aux

    def step(self, h_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        aux: Aux = {}
        r, s = self.core.step(self.norm(h_t), state, aux)  # (B, D)
        return h_t + r, s, aux


def build(params, ctx) -> DualMemory:
    return DualMemory(ctx.d_model, hebbian_kwargs(params.hebbian), episodic_kwargs(params.episodic))
