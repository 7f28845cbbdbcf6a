"""Params of the `mcts` planner and the planner probes (cheap to import: pydantic only)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MCTSParams(BaseModel):
    """The asynchronous MCTS planner.

    Learned parts (fitted by ``planner.fit`` on a trained backbone): an encoder of the
    backbone's injectable state to a latent ``z``, a decoder back, a latent dynamics MLP
    ``z' = f(z, token)``, a value head (loss over the next ``value_horizon`` tokens) and a
    prior head (next-token logits from ``z``, distilled from the LM head).
    """

    model_config = ConfigDict(extra="forbid")

    # -- learned models ------------------------------------------------------------
    d_latent: int = Field(32, ge=2, le=4096, description="width of the compressed latent z")
    d_token: int = Field(32, ge=2, le=4096, description="width of the dynamics model's own token embedding")
    d_hidden: int = Field(128, ge=4, le=16384, description="hidden width of the dynamics / value / prior MLPs")
    value_horizon: int = Field(
        8, ge=1, le=1024,
        description="k: the value head predicts the mean loss of the next k tokens",
    )
    fit_rollout_batches: int = Field(
        8, ge=1, le=1024,
        description="rollout batches collected for fitting (reused over the steps)",
    )
    fit_multistep: int = Field(
        4, ge=1, le=64,
        description="rollout length of the k-step dynamics loss and error report",
    )
    gate_steps: int = Field(
        20, ge=0, le=10000,
        description="steps fitting the learnable injection gate on realised loss (0: keep gate_init)",
    )
    critic_members: int = Field(
        4, ge=2, le=64,
        description="ensemble size of the injection critic Q(z, dz) (its spread is the per-state uncertainty)",
    )
    critic_steps: int = Field(
        200, ge=0, le=100000,
        description="optimiser steps per critic member on the realised loss deltas of the search's root children "
                    "(0: no critic; the search's own choice and confidence are used)",
    )
    critic_kappa: float = Field(
        1.0, ge=0,
        description="the critic ranks injections by mean gain - kappa * ensemble sd (a pessimistic bound)",
    )
    reanalyse_steps: int = Field(
        0, ge=0, le=100000,
        description="MuZero-style reanalyse after distillation: steps training the prior head toward the search's "
                    "root visit distribution on fitting states (0: off)",
    )
    # -- search --------------------------------------------------------------------
    world_model: Literal["latent", "backbone"] = Field(
        "latent",
        description=(
            "what the search steps: latent = the learned latent dynamics (cheap, approximate); backbone = the "
            "backbone's own O(1) step on the whole state, with the LM's own priors (exact; one model step per "
            "expanded child, no CUDA graph, planning on the model's device)"
        ),
    )
    simulations: int = Field(32, ge=1, le=100000, description="PUCT simulations per plan")
    depth: int = Field(4, ge=1, le=256, description="maximum search depth in tokens below the root")
    c_puct: float = Field(1.5, gt=0, description="exploration constant of PUCT")
    top_k: int = Field(4, ge=2, le=1024, description="children per expanded node: the top-k tokens of the prior")
    max_nodes: int = Field(
        256, ge=8, le=1_000_000,
        description="bound on the tree size (preallocated); full trees stop expanding",
    )
    root_noise: float = Field(
        0.0, ge=0, le=1,
        description="weight of seeded Dirichlet noise on the root priors (0: none)",
    )
    edge_logprob: float = Field(
        0.0, ge=0,
        description="edge reward weight on the token's log-probability under its parent's prior (MuZero's r(s, a); "
                    "0: no log-probability term); task rewards per token come from planner.set_token_rewards",
    )
    seed: int = Field(0, description="seed of the search's randomness (root noise, random-target ablation)")
    # -- injection -----------------------------------------------------------------
    alpha_max: float = Field(
        0.2, gt=0, le=1,
        description="a_max in a = a_max * sigmoid(gate + w . z) * confidence * trust (see the planner's docs)",
    )
    gate_init: float = Field(0.0, ge=-20, le=20, description="initial logit of the learnable gate")
    target_norm: Literal["cap", "none"] = Field(
        "cap",
        description=(
            "cap: before injection, each target is scaled down where its norm exceeds that of the state it replaces "
            "(per batch row and per head for Mamba-2, per layer for Mamba-1), so an injection can never raise a "
            "state's norm; none: inject the target as planned"
        ),
    )
    target_frame: Literal["rebase", "snapshot"] = Field(
        "rebase",
        description=(
            "rebase: a result applied `lag` steps after its snapshot moves the current state by the planned change "
            "(target = h_now + target - snapshot), so a stale plan never pulls the state back toward the old "
            "snapshot; snapshot: the planned target as it is (the old behaviour, kept as the stale-target control)"
        ),
    )
    # -- asynchronous planning -----------------------------------------------------
    asynchronous: bool = Field(
        True,
        description="plan in a background thread (False: plan inline, for probes and debugging)",
    )
    async_mode: Literal["auto", "stream", "thread"] = Field(
        "auto",
        description=(
            "how asynchronous plans run: stream = the captured search is replayed on its own CUDA stream, launched "
            "and polled from the generating thread (no second Python thread competing for the interpreter lock); "
            "thread = a background worker thread; auto = stream where a captured graph exists (CUDA with "
            "cuda_graphs), else thread"
        ),
    )
    plan_every: int = Field(4, ge=1, le=100000, description="request a plan every N generated tokens")
    max_lag: int = Field(8, ge=0, le=100000, description="results older than this many steps are dropped")
    lag_decay: float = Field(
        0.85, gt=0, le=1,
        description="alpha of a result applied `lag` steps late is scaled by lag_decay**lag",
    )
    sync_lag: int = Field(
        1, ge=1, le=100000,
        description="inline mode only: steps between the snapshot and applying its result",
    )
    device: Literal["auto", "cpu"] = Field(
        "auto", description="where the search runs: auto = the model's device; cpu = on a CPU copy of the planner "
                            "(a CUDA model's GPU then never sees the planner's work)")
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, capture the search as one CUDA graph per batch shape (eager if capture fails)",
    )
    worker_duty: float | None = Field(
        None, gt=0, le=1,
        description=(
            "largest fraction of wall time the background worker may spend planning: after a plan of d seconds "
            "it rests d*(1/duty - 1) (on a small CPU this leaves the cores and the interpreter lock to generation); "
            "null = 1.0 for plans on CUDA and 0.1 for plans on the CPU, where a worker thread planning "
            "continuously competes with generation for the interpreter lock and the cores (0.23x tokens/s on a "
            "2-core machine at duty 1.0)"
        ),
    )
    queue_size: int = Field(
        1, ge=1, le=64,
        description="pending requests; when full, new requests are skipped (never waited for)",
    )

    @model_validator(mode="after")
    def _check(self) -> "MCTSParams":
        if self.max_nodes < 1 + self.top_k:
            raise ValueError(f"max_nodes={self.max_nodes} cannot hold the root and its {self.top_k} children; "
                             f"set max_nodes >= {1 + self.top_k}")
        if self.world_model == "backbone" and self.device == "cpu":
            raise ValueError("world_model: backbone steps the model itself, on its own device; "
                             "use device: auto with it")
        if self.sync_lag > max(self.max_lag, 1) and not self.asynchronous:
            raise ValueError(
                f"sync_lag={self.sync_lag} exceeds max_lag={self.max_lag}: every inline result would be dropped"
            )
        return self


class PlannerEffectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seeds: int = Field(
        3, ge=1, le=1000,
        description="independent draws of validation windows (and of the random control's directions); every "
                    "comparison is paired by (seed, batch, row)",
    )
    loss_batches: int = Field(2, ge=1, le=1000, description="validation window batches per seed for the loss")
    batch_size: int = Field(4, ge=1, le=1024, description="rows per validation batch and samples per setting")
    seq_len: int = Field(64, ge=2, le=100000, description="tokens per validation window")
    prompt_len: int = Field(16, ge=1, le=100000, description="prompt tokens (taken from validation text) for samples")
    new_tokens: int = Field(64, ge=4, le=100000, description="tokens sampled per prompt and setting")
    samples: bool = Field(True, description="also generate samples off / on / random and time them (False: loss only)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int | None = Field(None, ge=1, description="sampling top-k (null: full distribution)")
    min_alpha: float = Field(
        0.005, ge=0, le=1,
        description=(
            "mean applied alpha of the planner-on loss run below which the verdict is 'inactive': the gate let "
            "(almost) nothing through, so the loss comparison says nothing about the plans"
        ),
    )
    forced_alpha: float = Field(
        0.1, gt=0, le=1,
        description=(
            "the controls (planned, matched random, stale target, oracle) are injected at this fixed alpha, gate "
            "and confidence bypassed, so that they differ only in direction"
        ),
    )
    control_norm: float | None = Field(
        None, gt=0,
        description=(
            "length of every forced move as a fraction of the snapshot's norm (null: each control takes the length "
            "of the planned move it replaces)"
        ),
    )
    oracle_horizon: int = Field(4, ge=2, le=1024, description="true next tokens the oracle controls look at")


class InjectionStabilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1200, ge=1, le=1_000_000, description="consecutive generation steps, each with an injection")
    batch_size: int = Field(2, ge=1, le=1024, description="rows generated in parallel")
    min_alpha: float = Field(
        0.5, ge=0, le=1,
        description="injections use max(planner alpha, min_alpha) to stress the state",
    )
    simulations: int = Field(
        4, ge=1, le=10000,
        description="search simulations per injection (kept small: one plan per step)",
    )
    norm_factor: float = Field(
        10.0, gt=1,
        description="pass only if the max state norm stays below norm_factor x that of a run without injection",
    )
    loss_rows: int = Field(
        4, ge=0, le=4096,
        description="validation windows scored teacher-forced with an injection at every step and without (0: skip)",
    )
    loss_seq_len: int = Field(64, ge=2, le=100000, description="tokens per validation window of the loss comparison")
    max_loss_increase: float | None = Field(
        None, gt=0,
        description="also fail when forced injection raises the validation loss by more than this many nats "
                    "(null: report the loss, judge stability only)",
    )


class LookaheadParams(BaseModel):
    """The ``lookahead`` task: random walks on a random graph; reach (or avoid) a goal within a horizon."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(32, ge=4, le=65536, description="nodes of the graph (= token ids)")
    degree: int = Field(3, ge=2, le=64, description="successors per node")
    graph_seed: int = Field(0, description="seed of the graphs (the same for training and evaluation)")
    modes: int = Field(2, ge=2, le=16, description="hidden modes, each with its own graph over the same nodes")
    switch: float = Field(0.05, ge=0, le=1, description="probability per step that a walk changes mode")
    seq_len: int = Field(64, ge=4, le=100000, description="tokens per training walk")
    num_train: int = Field(20000, ge=1, description="training walks")
    mode: Literal["reach", "avoid"] = Field("reach", description="succeed by emitting the goal, or by never emitting it")
    distance: int = Field(3, ge=1, le=64, description="graph distance from the prompt's last token to the goal")
    horizon: int = Field(6, ge=1, le=1024, description="tokens sampled per episode")
    prompt_len: int = Field(8, ge=1, le=100000, description="walk tokens given as the prompt")
    episodes: int = Field(64, ge=2, le=100000, description="episodes per evaluation")
    batch_size: int = Field(16, ge=1, le=4096, description="episodes generated together (sharing a goal)")
    reward: float = Field(1.0, ge=0, description="task reward on the goal's edges in the planner's search")
    forced_alpha: float = Field(0.5, gt=0, le=1, description="alpha of the forced, random and oracle settings")
    move_norm: float = Field(
        1.0, gt=0, description="length of a forced / random / oracle move as a fraction of the state's norm")

    @model_validator(mode="after")
    def _check(self) -> "LookaheadParams":
        if self.degree >= self.vocab_size:
            raise ValueError(f"degree={self.degree} must be below vocab_size={self.vocab_size}")
        return self
