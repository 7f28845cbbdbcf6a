"""The `mamba` backbone: a stack of pre-norm residual Mamba blocks with a steerable state.

    block(x) = x + mixer(norm(x))        norm: RMSNorm, mixer: Mamba-1 or Mamba-2
    backbone = blocks, then final_norm   (HF ``norm_f``)

Module names match HuggingFace ``MambaModel`` / ``Mamba2Model`` below the embedding
(``layers.N.norm``, ``layers.N.mixer.*``; ``norm_f`` is ``final_norm`` here), so their
weights load with :func:`crsm_planner.hf_compat.load_hf_state_dict`.

State per layer ``i`` (fp32 whatever the compute dtype):

* ``layers.<i>.conv``: the last ``d_conv - 1`` inputs of the causal convolution,
  ``(B, d_conv - 1, channels)``;
* ``layers.<i>.ssm``: the SSM state ``h``, ``(B, d_inner, d_state)`` for mamba1,
  ``(B, nheads, headdim, d_state)`` for mamba2. These are the injectable entries.

Steering API (public): :meth:`MambaBackbone.snapshot`, :meth:`~MambaBackbone.restore`,
:meth:`~MambaBackbone.inject` (new state) and :meth:`~MambaBackbone.inject_` (in place),
both the gated interpolation ``h <- (1 - a) h + a h_target`` with ``a`` clamped to [0, 1].
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Layer, State

from crsm_planner import kernels
from crsm_planner.mamba1 import Mamba1Mixer
from crsm_planner.mamba2 import Mamba2Mixer
from crsm_planner.mamba_params import MambaParams
from crsm_planner.norm import RMSNorm

IMPLS = ("auto", "torch", "naive", "kernels")


class MambaBlock(Layer):
    """``x + mixer(norm(x))`` with state ``{"conv", "ssm"}``."""

    def __init__(self, d_model: int, p: MambaParams) -> None:
        super().__init__()
        self.d_model = d_model
        self.residual_in_fp32 = p.residual_in_fp32
        self.norm = RMSNorm(d_model, eps=p.norm_eps)
        self.drop = nn.Dropout(p.dropout)
        common = dict(d_state=p.state_size(), d_conv=p.d_conv, expand=p.expand, dt_min=p.dt_min, dt_max=p.dt_max,
                      dt_init_floor=p.dt_init_floor, conv_bias=p.conv_bias, bias=p.bias, use_kernels=p.use_kernels)
        if p.mixer == "mamba1":
            self.mixer: Mamba1Mixer | Mamba2Mixer = Mamba1Mixer(d_model, dt_rank=p.time_step_rank(d_model), **common)
        else:
            self.mixer = Mamba2Mixer(d_model, headdim=p.headdim, ngroups=p.ngroups, chunk_size=p.chunk_size,
                                     norm_eps=p.norm_eps, **common)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.mixer.init_state(batch_size, device)  # fp32 regardless of dtype

    def _residual(self, x: Tensor, y: Tensor) -> Tensor:
        return (x.float() if self.residual_in_fp32 else x) + y

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new_state = self.mixer(self.norm(x.to(self.norm.weight.dtype)), state or None)
        return self._residual(x, self.drop(y)), new_state, {}

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        if not state:
            state = self.init_state(x_t.shape[0], x_t.device)
        y, new_state = self.mixer.step(self.norm(x_t.to(self.norm.weight.dtype)), state)
        return self._residual(x_t, self.drop(y)), new_state, {}


class MambaBackbone(Backbone):
    """A stack of :class:`MambaBlock` and a final RMSNorm; steerable through the ``ssm`` states."""

    def __init__(self, d_model: int, params: MambaParams | None = None) -> None:
        super().__init__(d_model)
        p = params or MambaParams()
        p.validate_for(d_model)
        if p.use_kernels == "always":
            kernels.require(kernels.MAMBA1_OPS if p.mixer == "mamba1" else kernels.MAMBA2_OPS)
        self.params = p
        self.layers = nn.ModuleList([MambaBlock(d_model, p) for _ in range(p.n_layers)])
        self.final_norm = RMSNorm(d_model, eps=p.norm_eps)
        # GPT-2 / mamba-ssm prenorm rescale: each block's output projection scaled by 1/sqrt(n_layers)
        with torch.no_grad():
            for layer in self.layers:
                layer.mixer.out_proj.weight.div_(math.sqrt(p.n_layers))

    @property
    def mixer_kind(self) -> str:
        return self.params.mixer

    def set_impl(self, impl: str) -> "MambaBackbone":
        """Force the scan implementation of every layer: "auto" (default: mamba-ssm kernels on
        CUDA when available, else pure PyTorch), "torch", "naive" (sequential reference) or
        "kernels" (mamba-ssm; CUDA tensors only). For tests, parity checks and benchmarks."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "kernels":
            kernels.require(kernels.MAMBA1_OPS if self.params.mixer == "mamba1" else kernels.MAMBA2_OPS)
        for layer in self.layers:
            layer.mixer.impl = impl
        return self

    # -- steering --------------------------------------------------------------------
    def injectable_keys(self) -> list[str]:
        return [f"layers.{i}.ssm" for i in range(self.n_layers)]

    @staticmethod
    def snapshot(state: Mapping[str, Tensor]) -> State:
        """A detached copy of ``state`` that later calls cannot change."""
        return {k: v.detach().clone() for k, v in state.items()}

    @staticmethod
    def restore(snapshot: Mapping[str, Tensor], into: State | None = None) -> State:
        """A fresh state equal to ``snapshot`` (the snapshot stays reusable). With ``into``,
        copy the snapshot's entries into those tensors in place and return ``into``."""
        if into is None:
            return {k: v.clone() for k, v in snapshot.items()}
        missing = set(snapshot) ^ set(into)
        if missing:
            raise KeyError(f"restore: snapshot and state have different keys: {sorted(missing)}")
        with torch.no_grad():
            for k, v in snapshot.items():
                into[k].copy_(v)
        return into

    def inject_(self, state: State, target: Mapping[str, Tensor], alpha: Tensor | float) -> State:
        """In-place :meth:`inject`: ``state[k] <- (1 - a) state[k] + a target[k]`` for the keys
        of ``target`` (injectable keys only), ``a`` a scalar or ``(B,)`` clamped to [0, 1].
        Returns ``state``. Use :meth:`inject` when the incoming tensors must stay unchanged."""
        allowed = set(self.injectable_keys())
        unknown = set(target) - allowed
        if unknown:
            raise KeyError(f"cannot inject into {sorted(unknown)}: injectable keys are {sorted(allowed)}")
        for key, tgt in target.items():
            cur = state[key]
            if tgt.shape != cur.shape:
                raise ValueError(f"inject_: target {key!r} has shape {tuple(tgt.shape)}, the state has {tuple(cur.shape)}")
            a = torch.as_tensor(alpha, device=cur.device, dtype=cur.dtype).clamp(0.0, 1.0)
            if a.dim() == 1:  # (B,) -> (B, 1, ..., 1)
                a = a.view(-1, *([1] * (cur.dim() - 1)))
            cur.lerp_(tgt.to(device=cur.device, dtype=cur.dtype), a)
        return state


def build_mamba(params: MambaParams, ctx) -> MambaBackbone:
    """Factory registered as backbone ``mamba``: ``factory(params, BuildContext)``."""
    return MambaBackbone(ctx.d_model, params)
