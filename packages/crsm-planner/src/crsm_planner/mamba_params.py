"""Params of the `mamba` backbone (cheap to import: pydantic only).

Defaults follow the Mamba papers for small models. Names map onto the HuggingFace
``MambaConfig`` / ``Mamba2Config`` fields as noted, see :mod:`crsm_planner.hf_compat`.
"""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator


class MambaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_layers: int = Field(4, ge=1, description="number of Mamba blocks (HF num_hidden_layers)")
    mixer: Literal["mamba1", "mamba2"] = Field(
        "mamba2", description="mamba1: selective scan with a per-channel (d_inner, d_state) state; "
        "mamba2: SSD with scalar decay per head and a (nheads, headdim, d_state) state")
    d_state: Union[int, None] = Field(
        None, ge=1, description="SSM state size N (HF state_size); None means 16 for mamba1, 64 for mamba2")
    d_conv: int = Field(4, ge=2, description="width of the causal depthwise convolution (HF conv_kernel)")
    expand: int = Field(2, ge=1, description="d_inner = expand * d_model (HF expand)")
    headdim: int = Field(64, ge=1, description="mamba2 only: channels per head; d_inner must be divisible by it (HF head_dim)")
    ngroups: int = Field(1, ge=1, description="mamba2 only: groups sharing B and C; nheads must be divisible by it (HF n_groups)")
    chunk_size: int = Field(64, ge=1, description="mamba2 only: chunk length of the SSD scan (speed only, not the result)")
    dt_min: float = Field(0.001, gt=0, description="smallest initial time step (HF time_step_min)")
    dt_max: float = Field(0.1, gt=0, description="largest initial time step (HF time_step_max)")
    dt_init_floor: float = Field(1e-4, gt=0, description="floor on the initial time steps (HF time_step_floor)")
    dt_rank: Union[Literal["auto"], int] = Field(
        "auto", description="mamba1 only: rank of the time-step projection; 'auto' = ceil(d_model / 16) (HF time_step_rank)")
    conv_bias: bool = Field(True, description="bias in the depthwise convolution (HF use_conv_bias)")
    bias: bool = Field(False, description="bias in in_proj and out_proj (HF use_bias)")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of every RMSNorm (HF layer_norm_epsilon)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each block's mixer output before the residual "
                           "add (nanoGPT's resid_dropout; not in HF Mamba, so 0 keeps weight parity)")
    residual_in_fp32: bool = Field(True, description="keep the residual stream in fp32 under autocast (HF residual_in_fp32)")
    use_kernels: Literal["auto", "never", "always"] = Field(
        "auto", description="mamba-ssm kernels on CUDA tensors: auto = when `import mamba_ssm` works, "
        "never = pure PyTorch everywhere, always = fail at build time if mamba_ssm is missing")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "MambaParams":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        if isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or an integer >= 1, got {self.dt_rank}")
        other = "mamba2" if self.mixer == "mamba1" else "mamba1"
        foreign = sorted(self.model_fields_set & _ONLY[other])
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: {other} only, but mixer is {self.mixer}; remove "
                             f"{'them' if len(foreign) > 1 else 'it'} or set mixer: {other}")
        d_model = (info.context or {}).get("d_model")
        if d_model is not None:  # statelab.spec passes the model width: refuse what cannot build
            self.validate_for(d_model)
        return self

    # -- derived sizes (need d_model, which comes from the model spec) ----------------
    def state_size(self) -> int:
        if self.d_state is not None:
            return self.d_state
        return 16 if self.mixer == "mamba1" else 64

    def time_step_rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def validate_for(self, d_model: int) -> None:
        """Raise ``ValueError`` with a fix when these params cannot build at ``d_model``."""
        d_inner = self.expand * d_model
        if self.mixer == "mamba2":
            if d_inner % self.headdim:
                divisors = [h for h in (8, 16, 32, 64, 128) if d_inner % h == 0]
                raise ValueError(
                    f"mamba2: d_inner = expand * d_model = {d_inner} is not divisible by headdim={self.headdim}; "
                    f"set headdim to a divisor of {d_inner} (e.g. {divisors[-1] if divisors else 1})")
            nheads = d_inner // self.headdim
            if nheads % self.ngroups:
                raise ValueError(
                    f"mamba2: nheads = d_inner / headdim = {nheads} is not divisible by ngroups={self.ngroups}; "
                    f"set ngroups to a divisor of {nheads}")


#: fields that only one mixer reads (setting them for the other is a mistake, not a no-op)
_ONLY = {"mamba1": {"dt_rank"}, "mamba2": {"headdim", "ngroups", "chunk_size"}}
