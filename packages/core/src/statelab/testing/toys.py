"""Small toy components that implement every interface, for core's tests and for examples.

They are real (tiny) models, not mocks: ``toy-rnn`` is a diagonal gated linear recurrence
that can learn simple text statistics, ``toy-ema`` a causal decaying-average memory.
They are *not* registered by default; tests add them with::

    reg = Registry(); reg.register_plugin(statelab.testing.toys, distribution="statelab-toys")
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from statelab.interfaces import (
    Aux,
    Backbone,
    Layer,
    Memory,
    Planner,
    PlanRequest,
    PlanResult,
    Probe,
    ProbeContext,
    ProbeResult,
    Regularizer,
    State,
)
from statelab.internals import publish
from statelab.plugins import Component, hookimpl

STATELAB_PLUGIN_API = 1


class ToyRNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(2, ge=1, description="number of recurrent layers")
    d_state: int = Field(32, ge=1, description="recurrent state width per layer")


class ToyRNNLayer(Layer):
    """``h_t = a * h_{t-1} + (1 - a) * W_in x_t``; ``y_t = x_t + g_t * W_out h_t`` with
    ``a = sigmoid(decay)`` per channel and a gate ``g_t = sigmoid(w_g . x_t)`` published as
    ``toy.gate``. State: ``{"h": (B, d_state)}``."""

    def __init__(self, d_model: int, d_state: int) -> None:
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.norm = nn.LayerNorm(d_model)
        self.w_in = nn.Linear(d_model, d_state)
        self.w_out = nn.Linear(d_state, d_model)
        self.w_gate = nn.Linear(d_model, 1)
        self.decay = nn.Parameter(torch.linspace(-1.0, 3.0, d_state))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return {"h": torch.zeros(batch_size, self.d_state, device=device, dtype=torch.float32)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        B, T, _ = x.shape
        h = state["h"] if state else torch.zeros(B, self.d_state, device=x.device)
        a = torch.sigmoid(self.decay)  # (S,)
        u = (1 - a) * self.w_in(self.norm(x))  # (B, T, S)
        # h_t = a^t h_0 + sum_{s<=t} a^(t-s) u_s, computed as a sequential scan (T is small here)
        hs = []
        for t in range(T):
            h = a * h + u[:, t]
            hs.append(h)
        H = torch.stack(hs, 1)  # (B, T, S)
        aux: Aux = {}
        g = publish(aux, "toy.gate", torch.sigmoid(self.w_gate(x)))  # (B, T, 1)
        return x + g * self.w_out(H), {"h": h}, aux

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        h = state["h"] if state else torch.zeros(x_t.shape[0], self.d_state, device=x_t.device)
        a = torch.sigmoid(self.decay)
        h = a * h + (1 - a) * self.w_in(self.norm(x_t))  # (B, S)
        aux: Aux = {}
        g = publish(aux, "toy.gate", torch.sigmoid(self.w_gate(x_t)))  # (B, 1)
        return x_t + g * self.w_out(h), {"h": h}, aux


class ToyRNN(Backbone):
    def __init__(self, d_model: int, n_layers: int = 2, d_state: int = 32) -> None:
        super().__init__(d_model)
        self.layers = nn.ModuleList([ToyRNNLayer(d_model, d_state) for _ in range(n_layers)])
        self.final_norm = nn.LayerNorm(d_model)

    def injectable_keys(self) -> list[str]:
        return [f"layers.{i}.h" for i in range(self.n_layers)]


class ToyMLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(1, ge=1, description="number of token-wise MLP layers")


class ToyMLPLayer(Layer):
    """A stateless token-wise residual MLP (no recurrent state, not steerable)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x, state=None):
        return x + self.net(x), {}, {}


class ToyMLP(Backbone):
    def __init__(self, d_model: int, n_layers: int = 1) -> None:
        super().__init__(d_model)
        self.layers = nn.ModuleList([ToyMLPLayer(d_model) for _ in range(n_layers)])


class ToyEMAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decay: float = Field(0.9, gt=0, lt=1, description="decay of the running average")


class ToyEMAMemory(Memory):
    """``m_t = decay * m_{t-1} + (1 - decay) * h_t``; output ``h_t + g * W m_t``.
    Publishes ``memory.recall`` (``W m_t``) and ``memory.gate``. State: ``{"m": (B, D)}``."""

    def __init__(self, d_model: int, decay: float = 0.9) -> None:
        super().__init__()
        self.d_model, self.decay = d_model, decay
        self.proj = nn.Linear(d_model, d_model)
        self.gate = nn.Parameter(torch.zeros(d_model))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return {"m": torch.zeros(batch_size, self.d_model, device=device, dtype=torch.float32)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        m = state["m"] if state else torch.zeros(x.shape[0], self.d_model, device=x.device)
        ms = []
        for t in range(x.shape[1]):
            m = self.decay * m + (1 - self.decay) * x[:, t]
            ms.append(m)
        M = torch.stack(ms, 1)  # (B, T, D)
        aux: Aux = {}
        recall = publish(aux, "memory.recall", self.proj(M))
        g = publish(aux, "memory.gate", torch.sigmoid(self.gate).expand_as(recall))
        return x + g * recall, {"m": m}, aux


class ToyPlannerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.1, ge=0, le=1, description="injection strength")


class ToyPlanner(Planner):
    """Proposes a target that shrinks every injectable state entry toward zero."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def plan(self, model, request: PlanRequest) -> PlanResult:
        keys = [f"backbone.{k}" for k in model.backbone.injectable_keys()]
        target = {k: 0.5 * request.state[k] for k in keys}
        B = request.logits.shape[0]
        conf = torch.ones(B)
        return PlanResult(target, conf, self.alpha * conf, request.step, request.generation_id)


class ToyGateL2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: float = Field(0.5, description="value the gates are pulled toward")


class ToyGateL2(Regularizer):
    """``mean((toy.gate - target)^2)`` over every layer that publishes ``toy.gate``."""

    requires = ("toy.gate",)

    def __init__(self, target: float) -> None:
        super().__init__()
        self.target = target

    def forward(self, aux, model=None):
        gates = [v for k, v in aux.items() if k.rsplit(":", 1)[-1] == "toy.gate"]
        loss = torch.stack([(g - self.target).pow(2).mean() for g in gates]).mean()
        return loss, {"gate_mean": torch.stack([g.mean() for g in gates]).mean().detach()}


class ToyNormProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batches: int = Field(2, ge=1, description="validation batches to average over")


class ToyNormProbe(Probe):
    """Mean L2 norm of the final hidden states on validation windows; passes if finite."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        was = model.training
        model.eval()
        T = 32
        toks = ctx.val_tokens if ctx.val_tokens is not None else torch.randint(0, model.vocab_size, (4 * T,))
        g = torch.Generator().manual_seed(ctx.seed)
        norms = []
        with torch.no_grad():
            for _ in range(self.batches):
                i = torch.randint(0, len(toks) - T, (4,), generator=g)
                x = torch.stack([toks[j : j + T] for j in i.tolist()]).to(ctx.device)
                h, _, _ = model.hidden(x)
                norms.append(h.norm(dim=-1).mean())
        model.train(was)
        value = torch.stack(norms).mean().item()
        ok = bool(torch.isfinite(torch.tensor(value)))
        return ProbeResult({"hidden_norm": value}, verdict="finite" if ok else "non-finite", passed=ok)


def _toy_rnn(params: ToyRNNParams, ctx) -> ToyRNN:
    return ToyRNN(ctx.d_model, params.n_layers, params.d_state)


def _toy_mlp(params: ToyMLPParams, ctx) -> ToyMLP:
    return ToyMLP(ctx.d_model, params.n_layers)


def _toy_ema(params: ToyEMAParams, ctx) -> ToyEMAMemory:
    return ToyEMAMemory(ctx.d_model, params.decay)


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component("backbone", "toy-rnn", ToyRNNParams, _toy_rnn, "diagonal gated linear recurrence (steerable)",
                  publishes=["toy.gate"], capabilities=frozenset({"injectable_state"})),
        Component("backbone", "toy-mlp", ToyMLPParams, _toy_mlp, "stateless token-wise MLP (not steerable)"),
        Component("memory", "toy-ema", ToyEMAParams, _toy_ema, "decaying running-average memory",
                  publishes=["memory.recall", "memory.gate"]),
        Component("planner", "toy-shrink", ToyPlannerParams, lambda p, c: ToyPlanner(p.alpha),
                  "pulls the state toward half its value", needs=frozenset({"injectable_state"})),
        Component("regularizer", "toy-gate-l2", ToyGateL2Params, lambda p, c: ToyGateL2(p.target),
                  "pulls toy.gate toward a target", requires=["toy.gate"]),
        Component("probe", "toy-norm", ToyNormProbeParams, lambda p, c: ToyNormProbe(p.batches),
                  "mean hidden-state norm"),
    ]


def toy_registry():
    """A fresh :class:`~statelab.plugins.Registry` holding only the toys."""
    from statelab.plugins import Registry

    import statelab.testing.toys as toys

    reg = Registry()
    reg.register_plugin(toys, distribution="statelab-toys", version="0")
    return reg


def toy_spec(**model_overrides) -> dict:
    """A small valid spec dict using the toys (byte tokenizer, so the vocabulary is known)."""
    model = {"d_model": 16, "backbone": {"kind": "toy-rnn", "n_layers": 2, "d_state": 8}}
    model.update(model_overrides)
    return {
        "name": "toy",
        "tokenizer": {"kind": "byte"},
        "model": model,
        "train": {"steps": 20, "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "eval_interval": 10,
                  "eval_batches": 2, "checkpoint_interval": 10, "sample_tokens": 8, "log_interval": 5},
        "tracking": {"enabled": False},
    }


__all__ = [
    "ToyEMAMemory",
    "ToyGateL2",
    "ToyMLP",
    "ToyNormProbe",
    "ToyPlanner",
    "ToyRNN",
    "statelab_components",
    "toy_registry",
    "toy_spec",
]

