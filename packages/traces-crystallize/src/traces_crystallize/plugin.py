"""Registration of traces-crystallize's components (cheap to import: no model code is loaded here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from statelab.plugins import Component, hookimpl

STATELAB_PLUGIN_API = 1


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _seed_keys(data: Any, names: dict[str, str], where: str) -> Any:
    """The prototype's config keys (``names``: seed key -> ours) renamed to ours; a key given
    under both names is an error (which would win is not obvious)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for seed, ours in names.items():
        if seed in out:
            if ours in out:
                raise ValueError(f"{where}: '{seed}' is the prototype's name for '{ours}'; give one of them, not both")
            out[ours] = out.pop(seed)
    return out


# The prototype's config keys (docs/plugins/traces-crystallize.md, "The seed's config keys").
SEED_TRACES_KEYS = {"bias_strength": "alpha", "salience_threshold": "threshold", "retention_rate": "retention",
                    "decay_rate": "decay"}
SEED_CRYSTALLIZATION_KEYS = {"motif_max_length": "max_motif_len"}
SEED_BACKBONE_KEYS = {"persistent_traces": "traces", "semantic_crystallization": "crystallization"}
SEED_LOSS_WEIGHTS = {"load_balance": "load-balance", "trace_utilization": "trace-utilization",
                     "crystallization": "crystallization"}


class TracesParams(_Params):
    """Also accepts the prototype's keys ``bias_strength``, ``salience_threshold``,
    ``retention_rate``, ``decay_rate`` (:data:`SEED_TRACES_KEYS`)."""

    enabled: bool = Field(False, description="keep persistent attention traces and bias attention with them")
    quota_per_head: int = Field(2048, ge=1, description="trace entries kept per head (the smallest are evicted)")
    threshold: float = Field(0.05, ge=0, description="theta: salience above which a link is reinforced")
    retention: float = Field(0.95, ge=0, le=1, description="lambda: M <- lambda M + (1 - lambda) S for salient links")
    decay: float = Field(0.98, ge=0, le=1, description="gamma: M <- gamma M for the other links")
    alpha: float = Field(0.1, description="initial bias strength alpha (per head)")
    learn_alpha: bool = Field(
        False, description="make alpha a learnable per-head parameter (its gradient through the bias costs a "
        "scatter in the attention backward; the default is the fixed alpha with its warmup schedule)"
    )
    normalize: bool = Field(
        False, description="divide each head's trace values by its largest before the bias, so alpha is the bias in "
        "logits at the strongest traced offset (false: the prototype's alpha * M, at most alpha * M's scale, which the "
        "update rule keeps small: 0.05 * S after one capture)"
    )
    alpha_warmup_steps: int = Field(500, ge=0, description="alpha ramps linearly from 0 over this many steps after warmup_steps")
    update_interval: int = Field(100, ge=1, description="capture traces every N training steps")
    capture_rows: int = Field(
        8, ge=1, description="batch rows of a capture step fed to the forward-only capture pass (explicit attention "
        "weights cost O(rows * heads * T^2) memory)"
    )
    warmup_steps: int = Field(1000, ge=0, description="first capture at this training step")
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="biased attention kernel: auto = cuDNN's fused kernel with the bias and the causal mask "
        "together where it applies (CUDA sm90+, half precision, no KV cache, no dropout, fixed alpha), else as sdpa; "
        "sdpa = SDPA with a float mask built from the traces, causal mask included (cuDNN's kernel over the full square "
        "on an H100); flex = FlexAttention with a score_mod (CUDA; off CUDA only without gradient)"
    )
    bias_chunks: int = Field(
        1, ge=1, description="query blocks of the biased SDPA path: block c attends only to the keys it can see, "
        "skipping most of the masked upper triangle (1 = one call over the full square; on an H100 4 blocks "
        "were no faster compiled and 2x slower eager)"
    )

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        return _seed_keys(data, SEED_TRACES_KEYS, "traces")


class CrystallizationParams(_Params):
    """Also accepts the prototype's key ``motif_max_length`` (:data:`SEED_CRYSTALLIZATION_KEYS`)."""

    enabled: bool = Field(False, description="log routing paths and crystallize motifs (needs ffn: moe)")
    log_interval: int = Field(10, ge=1, description="log routing paths every N training steps")
    max_log_tokens: int = Field(4096, ge=1, description="tokens sampled per logging step")
    max_motif_len: int = Field(4, ge=2, description="longest path segment tracked (layers)")
    max_nodes: int = Field(20_000, ge=16, description="trie nodes kept (the least frequent are pruned)")
    max_motifs: int = Field(512, ge=1, description="most motifs at once")
    min_frequency: float = Field(100, ge=0, description="tokens a segment must have been seen on")
    min_utility: float = Field(0.05, description="utility (nats of loss) below which a path is not / no longer a motif")
    max_entropy: float = Field(1.0, ge=0, description="router entropy (nats) above which a path is too unstable")
    prune_interval: int = Field(1000, ge=1, description="every N steps: measure utility, crystallize, unfreeze, prune")
    threshold: float = Field(4.0, description="crystallization score threshold")
    w_frequency: float = Field(1.0, description="w1, weight of log f")
    w_utility: float = Field(10.0, description="w2, weight of U (nats)")
    w_entropy: float = Field(1.0, description="w3, weight of H (nats)")
    w_age: float = Field(0.1, description="w4, weight of age (thousands of steps)")
    freeze: bool = Field(True, description="freeze the experts of a motif (gradient masked)")

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        return _seed_keys(data, SEED_CRYSTALLIZATION_KEYS, "crystallization")


class TransformerParams(_Params):
    n_layers: int = Field(6, ge=1, description="decoder layers")
    n_heads: int = Field(6, ge=1, description="attention heads (must divide d_model)")
    mlp_ratio: float = Field(4.0, gt=0, description="feed-forward hidden width / d_model")
    dropout: float = Field(0.0, ge=0, lt=1, description="attention, residual and feed-forward dropout")
    bias: bool = Field(False, description="biases in linear layers and LayerNorms")
    rotary_base: float = Field(10000.0, gt=0, description="rotary position embedding base")
    max_seq_len: int = Field(1024, ge=1, description="context length the rotary tables are precomputed for")
    ffn: Literal["mlp", "moe"] = Field("mlp", description="feed-forward: dense MLP or mixture of experts")
    n_experts: int = Field(8, ge=1, description="experts per MoE layer")
    top_k: int = Field(2, ge=1, description="experts per token")
    traces: TracesParams = Field(default_factory=TracesParams, description="persistent attention traces")
    crystallization: CrystallizationParams = Field(default_factory=CrystallizationParams, description="path logging and motifs")

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        """The prototype's ``persistent_traces`` / ``semantic_crystallization`` blocks stand for
        ``traces`` / ``crystallization``; its ``loss_weights`` belong in ``model.regularizers``."""
        if isinstance(data, dict) and "loss_weights" in data:
            lw = data["loss_weights"] if isinstance(data["loss_weights"], dict) else {}
            regs = ", ".join(f"{{kind: {SEED_LOSS_WEIGHTS.get(k, k)}, weight: {w}}}" for k, w in lw.items() if k != "task")
            raise ValueError("loss_weights: the prototype's loss weights are regularizer weights in this spec; move them "
                             f"to model.regularizers: [{regs}] (the task loss always has weight 1)")
        return _seed_keys(data, SEED_BACKBONE_KEYS, "backbone")

    @model_validator(mode="after")
    def _heads_divide_width(self, info: ValidationInfo) -> "TransformerParams":
        d_model = (info.context or {}).get("d_model")  # the model width, passed by statelab.spec
        if d_model is not None and d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={d_model}; pick a divisor of {d_model}")
        return self


def _transformer_publishes(p: TransformerParams) -> list[str]:
    out = []
    if p.ffn == "moe":
        out += ["router.probs", "router.experts"]
    if p.traces.enabled:
        out.append("traces.alpha")
    return out


class LoadBalanceParams(_Params):
    pass


class TraceUtilizationParams(_Params):
    pass


class CrystallizationRegParams(_Params):
    pass


class EWCParams(_Params):
    fisher_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay of the squared-gradient (diagonal Fisher) estimate")


class MotifsProbeParams(_Params):
    batches: int = Field(4, ge=1, description="validation batches measured")
    batch_size: int = Field(8, ge=1, description="rows per batch")
    seq_len: int = Field(128, ge=2, description="tokens per row")
    crystallize: bool = Field(False, description="run one crystallization round on validation data first")


class TracesProbeParams(_Params):
    layer: int = Field(0, ge=0, description="layer of the heatmap")
    head: int = Field(0, ge=0, description="head of the heatmap")
    size: int = Field(64, ge=2, description="heatmap side (positions)")


@hookimpl
def statelab_components() -> list[Component]:
    m = "traces_crystallize"
    return [
        Component("backbone", "transformer", TransformerParams, f"{m}.transformer:build",
                  "pre-norm decoder transformer (rotary, SDPA/flash, MLP or MoE) with persistent traces and motifs",
                  publishes=_transformer_publishes),
        Component("regularizer", "load-balance", LoadBalanceParams, f"{m}.regularizers:load_balance",
                  "Switch-style auxiliary load-balancing loss", requires=["router.probs"]),
        Component("regularizer", "trace-utilization", TraceUtilizationParams, f"{m}.regularizers:trace_utilization",
                  "shrinks the bias strength of heads whose traces attention does not use", requires=["traces.alpha"]),
        Component("regularizer", "crystallization", CrystallizationRegParams, f"{m}.regularizers:crystallization",
                  "router-entropy loss; drives utility measurement, crystallization and unfreezing",
                  requires=["router.probs"]),
        Component("regularizer", "ewc", EWCParams, f"{m}.regularizers:ewc",
                  "elastic weight consolidation anchoring crystallized experts", requires=["router.probs"]),
        Component("probe", "motifs", MotifsProbeParams, f"{m}.probes:motifs",
                  "motif table, FLOP reduction and routing flow plot", requires=["router.probs"]),
        Component("probe", "traces", TracesProbeParams, f"{m}.probes:traces",
                  "trace memory bytes per layer and a heatmap of one head", requires=["traces.alpha"]),
    ]
