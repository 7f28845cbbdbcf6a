"""Params models of the SSM backbones (pydantic only: imported by plugin.py, so cheap)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from statelab.plugins import Component, get_registry

MAMBA_MISSING = ("backbone samba builds its Mamba layers with the `mamba` backbone of crsm-planner, which is not "
                 "installed: pip install crsm-planner")


class S4DParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of S4D blocks")
    d_state: int = Field(32, ge=1, description="complex modes per channel (N/2 of the paper's real state size N)")
    init: Literal["lin", "inv"] = Field("lin", description="imaginary parts of A: S4D-Lin (pi n) or S4D-Inv")
    dt_min: float = Field(1e-3, gt=0, description="smallest initial step dt (log-uniform in [dt_min, dt_max])")
    dt_max: float = Field(0.1, gt=0, description="largest initial step dt")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each block's output before the residual")

    @model_validator(mode="after")
    def _check(self) -> "S4DParams":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self


class S5Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of S5 blocks")
    d_state: int = Field(64, ge=2, description="state size P shared by all channels (MIMO), even: the P/2 "
                         "HiPPO-N eigenvalues with non-negative imaginary part are kept (conjugate symmetry)")
    dt_min: float = Field(1e-3, gt=0, description="smallest initial step (log-uniform per state in [dt_min, dt_max])")
    dt_max: float = Field(0.1, gt=0, description="largest initial step")
    chunk_size: int = Field(64, ge=1, description="chunk length of the parallel scan (speed only, not the result)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each block's output before the residual")

    @model_validator(mode="after")
    def _check(self) -> "S5Params":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        if self.d_state % 2:
            raise ValueError(f"d_state ({self.d_state}) must be even: the HiPPO-N eigenvalues come in conjugate pairs")
        return self


class LinOSSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of LinOSS blocks")
    d_state: int = Field(64, ge=1, description="number of oscillators P (each a position y and velocity z)")
    variant: Literal["im", "imex"] = Field(
        "im", description="im: implicit step (dissipative, LinOSS-IM); imex: implicit-explicit, time-reversible "
        "and energy-conserving (LinOSS-IMEX)"
    )
    dt_min: float = Field(0.01, gt=0, description="smallest initial step dt per oscillator")
    dt_max: float = Field(1.0, gt=0, le=1, description="largest initial step dt (dt stays in (0, 1])")
    chunk_size: int = Field(64, ge=1, description="chunk length of the parallel scan (speed only, not the result)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each block's output before the residual")

    @model_validator(mode="after")
    def _check(self) -> "LinOSSParams":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self


class RetNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of RetNet blocks (retention + FFN)")
    n_heads: int = Field(4, ge=1, description="retention heads, head h decaying by gamma_h = 1 - 2^(-5-h)")
    value_factor: int = Field(2, ge=1, description="value width = value_factor * d_model (the paper uses 2)")
    ffn_mult: int = Field(2, ge=1, description="FFN hidden width = ffn_mult * d_model")
    mode: Literal["chunkwise", "parallel", "recurrent"] = Field(
        "chunkwise", description="form of retention used by forward (all three give the same result; step is "
        "always recurrent)"
    )
    chunk_size: int = Field(64, ge=1, description="chunk length of the chunkwise form")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each sub-block's output before the residual")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "RetNetParams":
        d = (info.context or {}).get("d_model")
        if d is not None:
            if d % self.n_heads:
                raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({d})")
            if (d // self.n_heads) % 2:
                raise ValueError(f"the key width per head d_model / n_heads ({d // self.n_heads}) must be even "
                                 "(the rotation turns pairs)")
        return self


class SambaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=2, description="layers, alternating Mamba (even) and sliding-window attention "
                          "(odd), each followed by a SwiGLU MLP")
    window: int = Field(64, ge=2, description="sliding attention window in tokens (the query itself included)")
    n_heads: int = Field(4, ge=1, description="attention heads of the window layers")
    mlp_mult: int = Field(2, ge=1, description="SwiGLU MLP hidden width = mlp_mult * d_model")
    mamba: dict[str, Any] = Field(
        default_factory=lambda: {"mixer": "mamba1"},
        description="params of the Mamba layers, as for the `mamba` backbone of crsm-planner (n_layers excepted); "
        "built through statelab's registry, so crsm-planner must be installed",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each sub-block's output before the residual")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "SambaParams":
        d = (info.context or {}).get("d_model")
        if d is not None and (d % self.n_heads or (d // self.n_heads) % 2):
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({d}) into even head widths")
        if "n_layers" in self.mamba:
            raise ValueError("samba.mamba.n_layers: set samba's n_layers instead (even layers are Mamba)")
        registry = get_registry()
        if ("backbone", "mamba") not in registry:
            raise ValueError(MAMBA_MISSING)
        try:
            registry.get("backbone", "mamba").params.model_validate({**self.mamba, "n_layers": 1}, context=info.context)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"samba.mamba (the mamba backbone's params): {problems}") from None
        return self


_STEERABLE = frozenset({"injectable_state"})


def components() -> list[Component]:
    """The SSM backbones, for crsd_memory.plugin's registration hook."""
    return [
        Component("backbone", "s4d", S4DParams, "crsd_memory.ssm.s4d:build",
                  "S4D: diagonal SSM, ZOH discretisation, FFT-convolution training path (Gu et al. 2022)",
                  capabilities=_STEERABLE),
        Component("backbone", "retnet", RetNetParams, "crsd_memory.ssm.retnet:build",
                  "RetNet: multi-scale retention (parallel, chunkwise, recurrent forms) + FFN (Sun et al. 2023)",
                  capabilities=_STEERABLE),
        Component("backbone", "s5", S5Params, "crsd_memory.ssm.s5:build",
                  "S5: MIMO diagonal SSM, HiPPO-N init, ZOH, parallel associative scan (Smith et al. 2023)",
                  capabilities=_STEERABLE),
        Component("backbone", "linoss", LinOSSParams, "crsd_memory.ssm.linoss:build",
                  "LinOSS: forced harmonic oscillators, implicit (IM) or IMEX step, parallel scan (Rusch & Rus 2025)",
                  capabilities=_STEERABLE),
        Component("backbone", "samba", SambaParams, "crsd_memory.ssm.samba:build",
                  "Samba-style hybrid: Mamba layers (the registered `mamba` backbone's) interleaved with sliding-window "
                  "attention, each followed by a SwiGLU MLP (Ren et al. 2024)", capabilities=_STEERABLE),
    ]
