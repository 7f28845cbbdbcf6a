"""The component interfaces of statelab (five model slots and the task slot), with their tensor and state contracts.

Conventions shared by every interface
-------------------------------------
* ``B`` batch, ``T`` time (tokens), ``D`` model width (``d_model``), ``V`` vocabulary.
* **State** is a flat ``dict[str, Tensor]`` (:data:`State`). Keys are short, dot-free
  names chosen by the component (``"h"``, ``"conv"``, ``"k_cache"``); the assembled model
  prefixes them (``"backbone.layers.3.h"``, ``"memory.0.H"``). Every tensor's first
  dimension is the batch, so batch rows are independent and states can be sliced, cloned,
  compared and saved with safetensors. A state produced by ``forward`` on a sequence is
  the state *after* its last token.
* **Aux** is a flat ``dict[str, Tensor]`` of named internals (see :mod:`statelab.internals`):
  tensors a component publishes for regularizers and probes, such as ``kssm.R``.
* Causality: the output at position ``t`` depends only on inputs ``<= t`` and the incoming
  state. ``forward(x[:, :t])`` followed by ``step`` on each next token equals
  ``forward(x)`` on the whole sequence, for outputs and for the final state.

The conformance kit in :mod:`statelab.testing` checks all of these for any implementation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from statelab.model import StatelabModel

State = dict[str, Tensor]
Aux = dict[str, Tensor]

__all__ = [
    "Aux",
    "Backbone",
    "Layer",
    "Memory",
    "PlanRequest",
    "PlanResult",
    "Planner",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "Regularizer",
    "State",
    "StatefulModule",
    "StepContext",
    "GenerationHook",
    "Metric",
    "Task",
    "TaskContext",
    "TaskResult",
    "gated_inject",
    "prefix_state",
    "unprefix_state",
]


def prefix_state(prefix: str, state: Mapping[str, Tensor]) -> State:
    """``{"h": t}`` -> ``{"<prefix>.h": t}``."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefix_state(prefix: str, state: Mapping[str, Tensor]) -> State:
    """Select the entries under ``prefix.`` and strip the prefix."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


class StatefulModule(nn.Module):
    """A causal sequence module with an explicit recurrent state.

    Contract:

    * ``init_state(batch_size, device, dtype)`` -> :data:`State`, every tensor ``(B, ...)``.
      The empty dict is a valid state for a stateless module.
    * ``forward(x, state)``: ``x`` is ``(B, T, D)``; ``state`` is ``None`` (meaning
      ``init_state``) or a state from ``init_state``/``forward``/``step``. Returns
      ``(y, new_state, aux)`` with ``y`` of shape ``(B, T, D)``. ``T`` may be any length >= 1.
    * ``step(x_t, state)``: ``x_t`` is ``(B, D)``; returns ``(y_t (B, D), new_state, aux)``.
      The default implementation calls ``forward`` on a length-1 sequence; recurrent
      modules override it with an O(1) update.

    Implementations must not modify the incoming state's tensors in place (callers keep
    snapshots), except through methods documented as in-place.
    """

    d_model: int

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return {}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:  # pragma: no cover
        raise NotImplementedError

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new_state, aux = self.forward(x_t.unsqueeze(1), state)  # (B, 1, D)
        return y.squeeze(1), new_state, aux


class Layer(StatefulModule):
    """One layer of a backbone; the same contract as :class:`StatefulModule`."""


class Backbone(StatefulModule):
    """Embeddings ``(B, T, D)`` -> hidden states ``(B, T, D)`` through a stack of layers.

    A backbone is ``layers`` (an ``nn.ModuleList`` of :class:`StatefulModule`), run in
    order, followed by ``final_norm`` (``nn.Identity`` unless the backbone needs one). Its
    state is the union of its layers' states under ``"layers.<i>."``. The assembler runs
    the layers itself so that it can place memories after any layer ``k``
    (``0 <= k < n_layers``); ``forward``/``step`` here run the bare stack.

    Steering (used by planners). A backbone whose state can be read and nudged lists the
    steerable entries in :meth:`injectable_keys` (keys of the *backbone* state, for example
    ``"layers.3.ssm"``) and applies a target through :meth:`inject`, a gated interpolation
    ``h <- (1 - a) h + a h_target``. A backbone that returns no injectable keys cannot
    take a planner; validation refuses that combination.
    """

    layers: nn.ModuleList

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.final_norm: nn.Module = nn.Identity()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        state: State = {}
        for i, layer in enumerate(self.layers):
            state.update(prefix_state(f"layers.{i}", layer.init_state(batch_size, device, dtype)))
        return state

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        new_state: State = {}
        aux: Aux = {}
        for i, layer in enumerate(self.layers):
            x, s, a = layer(x, unprefix_state(f"layers.{i}", state))
            new_state.update(prefix_state(f"layers.{i}", s))
            aux.update(a)
        return self.final_norm(x), new_state, aux

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device, x_t.dtype)
        new_state: State = {}
        aux: Aux = {}
        for i, layer in enumerate(self.layers):
            x_t, s, a = layer.step(x_t, unprefix_state(f"layers.{i}", state))
            new_state.update(prefix_state(f"layers.{i}", s))
            aux.update(a)
        return self.final_norm(x_t), new_state, aux

    # -- steering --------------------------------------------------------------------
    def injectable_keys(self) -> list[str]:
        """Backbone-state keys a planner may steer. Empty: this backbone cannot be steered."""
        return []

    def inject(self, state: State, target: Mapping[str, Tensor], alpha: Tensor | float) -> State:
        """Gated injection ``h <- (1 - a) h + a h_target`` on the injectable entries.

        ``alpha`` is a scalar or ``(B,)`` (one gate per batch row, broadcast over the
        remaining dimensions). Entries absent from ``target`` are left alone. Returns a
        new state; see :func:`gated_inject`.
        """
        allowed = set(self.injectable_keys())
        unknown = set(target) - allowed
        if unknown:
            raise KeyError(f"cannot inject into {sorted(unknown)}: injectable keys are {sorted(allowed)}")
        return gated_inject(state, target, alpha)


def gated_inject(state: Mapping[str, Tensor], target: Mapping[str, Tensor], alpha: Tensor | float) -> State:
    """Return a copy of ``state`` with ``s <- (1 - a) s + a target`` for every key in ``target``.

    ``a`` is clamped to ``[0, 1]`` so the result stays in the convex hull of the current and
    target states (numerically stable under any number of injections). The arithmetic is
    done in the state's own dtype.
    """
    out = dict(state)
    for key, tgt in target.items():
        cur = state[key]
        a = torch.as_tensor(alpha, device=cur.device, dtype=cur.dtype).clamp(0.0, 1.0)
        if a.dim() == 1:  # (B,) -> (B, 1, ..., 1)
            a = a.view(-1, *([1] * (cur.dim() - 1)))
        out[key] = torch.lerp(cur, tgt.to(cur.dtype), a)
    return out


class Memory(StatefulModule):
    """A causal memory over hidden states, placed after a backbone layer.

    Same contract as :class:`StatefulModule`: ``forward(h (B, T, D), state) -> (h_out
    (B, T, D), state, aux)``. ``h_out`` is the hidden stream that continues into the next
    layer, usually ``h + g * recall``. Memories should publish their recall vector as the
    named internal ``memory.recall`` (so the ``memory-use`` probe can force it to zero) and
    any gate as ``memory.gate``.

    Memories that live outside the model (a per-user store) also implement
    :meth:`ingest`, a write-only pass that updates the state without producing output.
    """

    #: True for memories whose contents live outside the module (a store on disk).
    external: bool = False

    def ingest(self, h: Tensor, state: State | None = None) -> State:
        """Write ``h (B, T, D)`` into memory and return the new state; produces no output.

        The default runs ``forward`` without gradient and keeps only the state.
        """
        with torch.no_grad():
            _, new_state, _ = self.forward(h, state)
        return new_state


@dataclass
class PlanRequest:
    """A snapshot handed to a planner during generation.

    ``state`` is a detached clone of the model state (keys as in the assembled model,
    ``"backbone.layers.<i>.<k>"``), ``logits`` the next-token logits ``(B, V)`` at that
    step, ``step`` the index of the token being generated, ``generation_id`` the id of
    the generation the snapshot belongs to.
    """

    state: State
    logits: Tensor
    step: int
    generation_id: int


@dataclass
class StepContext:
    """What a generation hook sees between two decoding steps.

    After the model has consumed token ``step`` and produced ``logits (B, V)`` for the next
    one, ``statelab.generate`` calls every hook with this context. ``state`` is the live
    model state; a hook that wants to change it (a planner injecting a target) returns a
    new state, which the next ``step`` uses; returning ``None`` leaves it unchanged.
    ``tokens`` holds the tokens generated so far ``(B, n)``; ``generation_id`` is unique
    per call to ``generate``; ``finished`` marks the last call (hooks release resources).
    """

    model: Any
    step: int
    generation_id: int
    tokens: Tensor
    logits: Tensor
    state: State
    finished: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


GenerationHook = Callable[[StepContext], "State | None"]


@dataclass
class PlanResult:
    """A planner's proposal: ``target`` (model-state keys -> tensors of the same shapes as
    in the snapshot) and ``confidence`` ``(B,)`` in ``[0, 1]``; the injection gate is
    ``alpha (B,)``, already scaled by the confidence. ``step`` and ``generation_id`` echo the
    request so late or foreign results can be dropped."""

    target: State
    confidence: Tensor
    alpha: Tensor
    step: int
    generation_id: int
    info: dict[str, Any] = field(default_factory=dict)


class Planner(nn.Module):
    """Proposes a target backbone state from a snapshot taken during generation.

    ``plan(model, request) -> PlanResult`` may be slow; the generation loop decides
    whether to call it synchronously or hand it to a background worker through
    :meth:`generation_hook`. The backbone applies the result with
    :meth:`Backbone.inject`. ``fit(model, batches)`` trains whatever the planner learns
    from a trained backbone (dynamics, value) and returns metrics.
    """

    def plan(self, model: "StatelabModel", request: PlanRequest) -> PlanResult:  # pragma: no cover
        raise NotImplementedError

    def fit(self, model: "StatelabModel", batches: Callable[[], Tensor], **kwargs: Any) -> dict[str, float]:
        return {}

    def generation_hook(self, model: "StatelabModel") -> "GenerationHook | None":
        """A hook (see :class:`StepContext`) that :func:`statelab.generate` installs when the
        model has this planner; ``None`` means the planner takes no part in generation."""
        return None


class Regularizer(nn.Module):
    """Turns named internals into an auxiliary loss.

    ``requires`` lists internal names (``"kssm.u"``) that must be published by some
    component of the model; validation refuses a spec where one is missing.
    ``forward(aux, model) -> (loss scalar, metrics)``; the trainer multiplies the loss by
    the spec's ``weight`` and logs it separately.
    """

    requires: Sequence[str] = ()

    def forward(self, aux: Aux, model: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class ProbeContext:
    """What a probe gets besides the model: validation tokens ``(N,)`` (or ``None``),
    the tokenizer (or ``None``), a directory for artifacts (default: a new temporary
    directory, so a probe run by hand never writes into the working directory), a device
    and a seed."""

    val_tokens: Tensor | None = None
    tokenizer: Any = None
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="statelab-probe-")))
    device: torch.device = torch.device("cpu")
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeResult:
    """``metrics`` (name -> float), ``verdict`` (a short word where one is defined,
    e.g. ``"causal"``), ``passed`` (``None`` when no pass/fail is defined) and
    ``artifacts`` (name -> file path, plots and tables)."""

    metrics: dict[str, float]
    verdict: str | None = None
    passed: bool | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)


class Probe:
    """A measurement or intervention on a built or trained model.

    ``run(model, ctx) -> ProbeResult``. Probes never train the model they probe and leave
    it in the mode they found it in.
    """

    def run(self, model: "StatelabModel", ctx: ProbeContext) -> ProbeResult:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# tasks (the sixth slot): data to train on and metrics on the trained model


@dataclass(frozen=True)
class Metric:
    """A metric a task reports: ``name`` (a key of :attr:`TaskResult.metrics`), its
    direction, and a description for reports."""

    name: str
    higher_is_better: bool
    description: str = ""


@dataclass
class TaskContext:
    """What :meth:`Task.evaluate` gets besides the model and data: the device, a seed for
    anything random in the evaluation, a directory for artifacts, and ``extra`` (e.g. the
    :class:`~statelab.train.TrainResult` under ``"train"`` when run by ``statelab bench``)."""

    device: torch.device = torch.device("cpu")
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="statelab-task-")))
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """A task's evaluation of one trained model.

    * ``metrics``: name -> float, one value per model (a suite takes intervals of these over
      seeds and compares them with its baseline).
    * ``samples``: name -> per-item values (per example, per batch) behind a metric, for an
      interval within one model; optional.
    * ``tables``: name -> rows (dicts), e.g. ``"passkey"`` rows ``{length_tokens,
      length_chars, depth, accuracy}``; reports draw heatmaps and curves from them.
    * ``artifacts``: name -> file written under ``TaskContext.out_dir``.
    """

    metrics: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)


class Task:
    """A benchmark task: it makes the data a model trains on and scores the trained model.

    Registered in the ``task`` slot (``Component(slot="task", name=..., params=...,
    factory=...)``, ``factory(params, ctx)`` with ``ctx`` a :class:`statelab.build.BuildContext`
    or ``None``). A run trains on a task's data when its spec says ``data: {kind: <task name>,
    params: {...}}``: :func:`statelab.data.make_data` then calls :meth:`make_data`. A suite
    (``statelab bench``) applies :meth:`spec_overrides` to each spec, trains it with
    :func:`statelab.train.train`, and calls :meth:`evaluate` on the trained model.

    * ``metrics``: the :class:`Metric` objects ``evaluate`` returns; ``primary`` names the one
      a suite reports first, picks grid winners by and compares with the baseline.
    * ``make_data(spec, seed) -> DataSource``: pure in ``(spec, seed)`` like every data source
      (batches by step; see :mod:`statelab.data.base`).
    * ``spec_overrides() -> dict``: dotted spec fields to set so that a spec trains on this
      task (default: ``data.kind`` = this task's name, ``data.params`` = its params).
    * ``evaluate(model, data, ctx) -> TaskResult``: never trains, leaves the model's mode as
      found.
    """

    kind: str = ""
    metrics: Sequence[Metric] = ()
    primary: str = ""

    def __init__(self, params: Any = None) -> None:
        self.params = params

    def make_data(self, spec: Any, seed: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec_overrides(self) -> dict[str, Any]:
        params = self.params.model_dump(mode="json") if hasattr(self.params, "model_dump") else dict(self.params or {})
        return {"data.kind": self.kind, "data.params": params}

    def evaluate(self, model: "StatelabModel", data: Any, ctx: TaskContext) -> TaskResult:  # pragma: no cover
        raise NotImplementedError

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.kind!r} reports no metric {name!r}; it reports {', '.join(m.name for m in self.metrics)}")
