"""Registration of kssm-oscillators's components (cheap to import: no model code is loaded here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from statelab.plugins import Component, hookimpl

STATELAB_PLUGIN_API = 1

#: upper bounds of the prototype's seven tone zones of R (the last one is 1.0 inclusive)
TONE_ZONES = (0.10, 0.30, 0.50, 0.70, 0.85, 0.95, 1.00)
TONE_NAMES = ("unformed", "intimacy", "balance", "mystery", "wonder", "passion", "ache")


class KSSMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of oscillator layers")
    n_oscillators: int = Field(128, ge=2, description="oscillators per layer (N)")
    n_harmonics: int = Field(4, ge=1, description="harmonics k = 1..K of the order parameters")
    group_levels: list[int] = Field(
        default_factory=lambda: [1, 4, 16, 64],
        min_length=1,
        description="oscillator groupings read out: each entry g splits the N oscillators into g equal groups "
        "(1 = the whole population, n_oscillators / 2 = pairs); each must divide n_oscillators and the largest entry",
    )
    substeps: int = Field(1, ge=1, description="Euler integration substeps per token")
    token_time: float = Field(0.5, gt=0, description="integration time per token (dt = token_time / substeps)")
    coupling_init: float = Field(0.5, description="initial Kuramoto coupling K of every oscillator")
    freq_spread: float = Field(1.0, ge=0, description="natural frequencies start evenly spaced in [-spread, spread] rad per unit time")
    readout_mult: int = Field(2, ge=0, description="hidden width of the readout MLP in units of d_model (0: linear readout only)")
    readout: Literal["full", "order"] = Field(
        "full", description="what reaches the output: 'full' = R, R cos psi, R sin psi of every group (phases of small "
        "groups included); 'order' = only the magnitudes R of the groups at readout_levels (a real R bottleneck)",
    )
    readout_levels: list[int] = Field(
        [1], min_length=1, description="readout 'order': the group levels whose R reaches the output (1 = the whole "
        "population); each must be one of group_levels",
    )
    clamp_u: bool = Field(True, description="hard-clamp u to [u_min, u_max] (v3); false is the ablation")
    clamp_gradient: Literal["straight-through", "hard"] = Field(
        "straight-through", description="gradient of the clamp: 'straight-through' passes the raw u's gradient, so the "
        "barrier can move u off a bound; 'hard' is the prototype's (zero gradient at the bounds: u can stick at u_min)",
    )
    u_min: float = Field(0.1, gt=0, description="lower clamp of u")
    u_max: float = Field(10.0, gt=0, description="upper clamp of u")
    den_eps: float = Field(1e-3, gt=0, description="|denominator of u| is kept at least this large (sign kept)")
    param_scale: float = Field(4.0, gt=0, description="soft bound s of the ten parameters: p <- s tanh(p / s)")
    grad_horizon: int = Field(
        4, ge=0, description="training only: gradients through the phase recurrence are cut every this many tokens "
        "(truncated backprop; the forward pass is unchanged); 0 = full backprop through time",
    )
    forcing_gain: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[lo, hi]: learnable per-oscillator gains on the input forcing F, initialised log-spaced in "
        "[lo, hi] (weakly forced oscillators keep their phase longer: slow memory); null = gain 1 for all",
    )
    integrator: Literal["euler", "split"] = Field(
        "euler", description="'euler': explicit Euler substeps of the Kuramoto ODE (the prototype); 'split': the rotation "
        "exactly, then the pull of forcing + mean field solved exactly over the substep (no overshoot: a strong field "
        "writes its phase instead of making the map chaotic)",
    )
    kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="the phase recurrence: 'triton' = one fused kernel per layer and pass (float32), "
        "'torch' = the reference loop of small ops, 'auto' = triton for float32 on CUDA when Triton is installed",
    )

    @model_validator(mode="after")
    def _check(self) -> "KSSMParams":
        bad = [g for g in self.group_levels if g < 1 or self.n_oscillators % g or max(self.group_levels) % g]
        if bad:
            raise ValueError(
                f"group_levels {self.group_levels}: {bad} do not divide n_oscillators={self.n_oscillators} and the "
                f"largest level {max(self.group_levels)}; use divisors such as [1, 4, 16] with n_oscillators a multiple of 16"
            )
        missing = [g for g in self.readout_levels if g not in self.group_levels]
        if self.readout == "order" and missing:
            raise ValueError(f"readout_levels {missing} are not among group_levels {self.group_levels}; "
                             "pick levels from group_levels (1 = the whole population)")
        if self.forcing_gain is not None and not 0 < self.forcing_gain[0] <= self.forcing_gain[1]:
            raise ValueError(f"forcing_gain {self.forcing_gain} must be [lo, hi] with 0 < lo <= hi, e.g. [0.05, 1.0]")
        if self.u_min >= self.u_max:
            raise ValueError(f"u_min ({self.u_min}) must be below u_max ({self.u_max})")
        return self


class BistabilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-4, gt=0, description="eps of the log barrier -log(u + eps)")
    delta_weight: float = Field(
        0.0, ge=0, description="weight of an extra barrier -log(|Delta| + eps) keeping Delta = bg - cf away from 0 (0: off)"
    )


class CausalityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    internal: str = Field(description="the named internal to test (bare, e.g. 'kssm.R', or '<site>:<name>')")
    n_inputs: int = Field(32, ge=4, description="validation windows (the paired units of the permutation test)")
    seq_len: int = Field(64, ge=2, description="tokens per window")
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    values: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="the two values the internal is forced to; null = its observed 10% and 90% quantiles",
    )
    std_threshold: float = Field(0.01, ge=0, description="variance test: the internal's std across inputs must exceed this")
    p_threshold: float = Field(0.01, gt=0, lt=1, description="intervention test: permutation p-value must be below this")
    min_kl: float = Field(1e-4, ge=0, description="intervention test: the KL effect size must also exceed this (nats)")
    r_threshold: float = Field(0.05, ge=0, lt=1, description="correlation test: |r| with the output entropy must exceed this")
    corr_p_threshold: float = Field(0.01, gt=0, lt=1, description="correlation test: the correlation's p-value must be below this")
    n_permutations: int = Field(5000, ge=100, description="random sign flips (exact enumeration when n_inputs <= 16)")


class RZonesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    internal: str = Field("kssm.R", description="the order-parameter internal to bin (values in [0, 1])")
    element: int = Field(
        0, ge=0, description="which entry of the trailing dims to read (kssm.R: 0 = whole population, first harmonic)"
    )
    n_windows: int = Field(16, ge=1, description="validation windows for the zone distribution")
    seq_len: int = Field(128, ge=2, description="tokens per validation window")
    prompt_tokens: int = Field(32, ge=1, description="validation tokens used as the generation prompt")
    gen_tokens: int = Field(200, ge=1, description="tokens generated for the R trajectory plot")
    temperature: float = Field(0.8, ge=0, description="sampling temperature of the generated text (0: greedy)")
    min_zones: int = Field(3, ge=1, le=7, description="pass when R visits at least this many zones (v3's target: 3)")


class VerdictsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    internal: str = Field("kssm.R", description="the named internal to judge (bare, e.g. 'kssm.R', or '<site>:<name>')")
    element: list[int] | None = Field(
        [0, 0], description="index into the internal's trailing dims (kssm.R/psi: [group, harmonic]; [0, 0] = whole "
        "population, harmonic 1); null = the whole internal",
    )
    batches: int = Field(8, ge=2, description="validation batches (the paired units of every interval)")
    batch_size: int = Field(8, ge=2, description="windows per batch")
    seq_len: int = Field(64, ge=2, description="tokens per window")
    quantiles: list[float] = Field(
        [0.1, 0.9], min_length=1, description="on-the-path test: the element is forced to these quantiles of its own "
        "distribution on the same data (in-distribution values)",
    )
    modes: list[Literal["mean", "shuffle-positions", "shuffle-rows"]] = Field(
        ["mean", "shuffle-positions", "shuffle-rows"], min_length=1, description="functional test: the ablations",
    )
    null: bool = Field(True, description="functional test against an untrained model of the same spec (false: no null, "
                                         "so never 'functional')")
    min_kl: float = Field(1e-6, ge=0, description="on the path when the KL interval's lower end exceeds this (nats; float32 noise is ~1e-9)")
    min_delta_loss: float = Field(0.005, ge=0, description="functional needs a mean loss increase above this (nats)")
    null_margin: float = Field(0.25, gt=0, description="varies test: 'at null' when R's mean and sd lie within this "
                                                       "fraction of the random-phase null's")


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component(
            "backbone", "kssm", KSSMParams, "kssm_oscillators.kssm:build",
            "Kuramoto oscillators per layer; multi-scale order parameters are the only path to the output; "
            "v3 bistability (u scales the coupling)",
            publishes=["kssm.u", "kssm.delta", "kssm.theta", "kssm.R", "kssm.psi"],
        ),
        Component(
            "regularizer", "bistability", BistabilityParams, "kssm_oscillators.bistability:build_regularizer",
            "log barrier -log(u + eps) on kssm.u (optional barrier on |Delta|); logs u and R statistics",
            requires=lambda p: ["kssm.u", "kssm.delta"] if p is not None and p.delta_weight > 0 else ["kssm.u"],
        ),
        Component(
            "probe", "causality", CausalityParams, "kssm_oscillators.causality:build",
            "variance, intervention (paired permutation test, KL) and entropy-correlation tests of any internal; "
            "verdict causal / epiphenomenal / constant; passed when all three pass",
            requires=lambda p: [p.internal.rsplit(":", 1)[-1]] if p is not None else [],
        ),
        Component(
            "probe", "verdicts", VerdictsParams, "kssm_oscillators.verdicts:build",
            "three separate verdicts on one element of an internal: on the path (KL of in-distribution forcing, "
            "interval over batches), functional (mean/shuffle ablation against an untrained model of the same spec), "
            "varies (against random phases for kssm.R, else the untrained model)",
            requires=lambda p: [p.internal.rsplit(":", 1)[-1]] if p is not None else ["kssm.R"],
        ),
        Component(
            "probe", "r-zones", RZonesParams, "kssm_oscillators.rzones:build",
            "distribution of R over the seven tone zones, zones visited, R trajectory over generated text",
            requires=lambda p: [p.internal.rsplit(":", 1)[-1]] if p is not None else ["kssm.R"],
        ),
    ]
