"""Registration of crsd-memory's components and their params (cheap to import: no model code).

Components
----------
* memory ``hebbian``   per-head associative matrix ``H <- gamma H + eta k v^T`` (crsd_memory.hebbian)
* memory ``episodic``  priority slot buffer of (key, value, priority) per row (crsd_memory.episodic)
* memory ``dual``      both of the above, merged by a learned gate (crsd_memory.dual)
* backbone ``crsd``    the CRSD cell stacked into layers (crsd_memory.crsd)
* probe ``memory-use`` loss change when ``memory.recall`` is forced to zero (crsd_memory.probe)
* backbones ``s4d``, ``s5``, ``linoss``, ``retnet``, ``samba``: the SSM families (crsd_memory.ssm; params there)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from statelab.plugins import Component, hookimpl

from crsd_memory.ssm.params import components as ssm_components

STATELAB_PLUGIN_API = 1


class HebbianParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_heads: int = Field(4, ge=1, description="number of heads, each with its own matrix H (d_head x d_head)")
    d_head: int | None = Field(None, ge=1, description="key/value width per head; null = d_model // n_heads")
    temperature: float = Field(1.0, gt=0, description="recall = (q_hat^T H) / temperature, q_hat the unit-norm query")
    topk: int | None = Field(
        None, ge=1, description="keep the topk largest-magnitude recall entries per head; null = all"
    )
    detach: bool = Field(False, description="no gradient through the memory writes (keys, values, decay, rate)")
    decay_min: float = Field(0.5, gt=0, lt=1, description="lower bound of the learned decay gamma")
    decay_max: float = Field(0.999, gt=0, lt=1, description="upper bound of the learned decay gamma")
    lr_max: float = Field(1.0, gt=0, description="upper bound of the learned write rate eta (eta in (0, lr_max))")
    chunk_size: int = Field(64, ge=1, description="chunk length of the parallel (linear-attention style) forward")
    write_gate: bool = Field(
        False, description="learn a per-token, per-head write strength in (0, 1) that scales each write "
        "(H <- gamma H + eta w_t k v^T), so the memory can skip tokens instead of writing every one"
    )
    rule: Literal["hebbian", "delta"] = Field(
        "hebbian", description="hebbian: add eta w_t k v^T (the seed's rule); delta: replace what k recalls, "
        "H <- H + eta w_t k (v - H^T k)^T (DeltaNet; pair it with write_gate)"
    )
    decay: Literal["head", "token"] = Field(
        "head", description="head: one learned decay per head in [decay_min, decay_max]; token: input-dependent "
        "decay a_t = exp(-softplus(W x_t + b)) per head, starting in [0.95, 0.999] (Gated DeltaNet / GLA)"
    )
    key_conv: int | None = Field(
        None, ge=2, description="width of a short causal depthwise convolution over the keys (e.g. 4); null = none"
    )

    @model_validator(mode="after")
    def _check(self) -> "HebbianParams":
        if self.decay_min >= self.decay_max:
            raise ValueError(f"decay_min ({self.decay_min}) must be below decay_max ({self.decay_max})")
        if self.topk is not None and self.d_head is not None and self.topk > self.d_head:
            raise ValueError(f"topk ({self.topk}) cannot exceed d_head ({self.d_head}); lower topk or raise d_head")
        if self.rule == "delta" and self.lr_max > 2:
            raise ValueError(f"rule delta needs lr_max <= 2 (got {self.lr_max}): a larger write rate diverges")
        return self


class EpisodicParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slots: int = Field(32, ge=1, description="slots per batch row, each (key, value, priority)")
    d_key: int | None = Field(None, ge=1, description="key and value width; null = d_model")
    temperature: float = Field(
        0.1, gt=0, description="recall logits = cos(q, k) / temperature + log sigmoid(importance)"
    )
    topk: int | None = Field(None, ge=1, description="attend only to the topk best-matching slots; null = all")
    window: int | None = Field(
        None, ge=1, description="recall only slots written in the last `window` steps; null = all"
    )
    recency: float = Field(
        0.01, ge=0, description="priority bonus per step of recency (older entries lose priority at this rate)"
    )
    detach: bool = Field(False, description="no gradient through what is written (keys, values, importance)")
    chunk_size: int = Field(64, ge=1, description="chunk length of the parallel forward")
    eviction: Literal["hard", "straight-through"] = Field(
        "hard", description="hard: the top-slots choice passes no gradient (the seed); straight-through: same "
        "forward, gradient from a soft buffer that keeps each entry with probability sigmoid((u - theta) / "
        "eviction_temperature), so the importance head learns what to keep"
    )
    eviction_temperature: float = Field(
        1.0, gt=0, description="softness of the straight-through eviction, in priority units"
    )


class DualParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hebbian: HebbianParams = Field(default_factory=HebbianParams, description="the Hebbian associative memory")
    episodic: EpisodicParams = Field(default_factory=EpisodicParams, description="the episodic slot buffer")


class CRSDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(2, ge=1, description="number of CRSD cells")
    d_reservoir: int = Field(64, ge=1, description="width of the fixed (untrained) leaky reservoir per layer")
    reservoir_tau_min: float = Field(1.0, gt=0, description="shortest reservoir time constant, in tokens")
    reservoir_tau_max: float = Field(256.0, gt=0, description="longest reservoir time constant, in tokens")
    spectral: bool = Field(
        True, description="use the spectral sub-block (LayerNorm, FFT, filter, inverse FFT, Linear); false = "
        "its fold, LayerNorm then the Linear (FFT-filter-iFFT is a linear map, so it only reparameterises)"
    )
    memory: bool = Field(True, description="include the dual memory whose recall gates the state update")
    memory_layers: list[int] | None = Field(None, description="layers that get a dual memory; null = every layer")
    hebbian: HebbianParams = Field(default_factory=HebbianParams, description="the cell's Hebbian memory")
    episodic: EpisodicParams = Field(default_factory=EpisodicParams, description="the cell's episodic buffer")
    reservoir: bool = Field(True, description="include the fixed leaky reservoir (false: ablate it)")
    chunk_size: int = Field(
        64, ge=1, description="chunk length of the parallel linear scans (hidden state and reservoir)"
    )

    @model_validator(mode="after")
    def _check(self) -> "CRSDParams":
        if self.reservoir_tau_min > self.reservoir_tau_max:
            raise ValueError("reservoir_tau_min must not exceed reservoir_tau_max")
        for k in self.memory_layers or []:
            if not 0 <= k < self.n_layers:
                raise ValueError(f"memory_layers entry {k} is outside 0..{self.n_layers - 1}")
        return self


class MemoryUseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    internal: str = Field("memory.recall", description="internal forced to zero (bare name: every site)")
    threshold: float = Field(0.01, ge=0, description="loss increase (nats/token) above which the memory counts as used")
    batches: int = Field(8, ge=1, description="validation batches averaged")
    batch_size: int = Field(8, ge=1, description="rows per batch")
    seq_len: int = Field(128, ge=2, description="tokens per row (windows of the validation stream)")


def _memory_internals(params) -> list[str]:
    return ["memory.recall", "memory.gate"]


def _dual_internals(params) -> list[str]:
    return ["memory.recall", "memory.gate", "memory.hebbian_norm", "memory.episodic_norm"]


def _crsd_internals(params: CRSDParams) -> list[str]:
    names = ["crsd.update_gate"]
    if params.memory:
        names += _dual_internals(params)
    return names


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component("memory", "hebbian", HebbianParams, "crsd_memory.hebbian:build",
                  "per-head Hebbian associative matrix with learned decay/rate, cosine recall (chunked parallel form)",
                  publishes=_memory_internals),
        Component("memory", "episodic", EpisodicParams, "crsd_memory.episodic:build",
                  "priority slot buffer: writes replace the lowest-priority slot; cosine recall with temperature",
                  publishes=_memory_internals),
        Component("memory", "dual", DualParams, "crsd_memory.dual:build",
                  "Hebbian + episodic memories merged by a learned gate", publishes=_dual_internals),
        Component("backbone", "crsd", CRSDParams, "crsd_memory.crsd:build",
                  "CRSD cell: leaky recurrence + fixed reservoir, spectral feature mixing, dual-memory-gated update",
                  publishes=_crsd_internals, capabilities=frozenset({"injectable_state"})),
        Component("probe", "memory-use", MemoryUseParams, "crsd_memory.probe:build",
                  "validation loss change when the memory recall is forced to zero (used / unused)",
                  requires=lambda p: [p.internal]),
        *ssm_components(),
    ]
