"""Training-time callbacks: everything the trainer does around its loop is one of these.

The trainer (:class:`statelab.trainer.Trainer`) owns the optimisation loop; checkpointing,
tracking, progress, evaluation and sampling, the planner fit and the probes are callbacks,
and so is any training-time behaviour a component or a third-party distribution needs.
Override only the hooks you need; every hook receives the trainer, which exposes:

* ``trainer.spec`` (the :class:`~statelab.spec.RunSpec`), ``trainer.model`` (the
  :class:`~statelab.model.StatelabModel`, unwrapped), ``trainer.data``, ``trainer.device``,
  ``trainer.run_dir``, ``trainer.is_main`` (rank 0), ``trainer.world_size``;
* ``trainer.step``: optimizer steps done so far (``grad_accum`` micro-batches make one);
* ``trainer.metrics``: the latest value of every logged metric; ``trainer.log_metrics(d)``
  logs more (rank 0: mlflow and ``metrics.jsonl``);
* ``trainer.stop_reason()``: ``None``, or why the run must stop now (``"interrupted"`` by a
  signal or ``stop_after``, ``"time_budget"``); a long hook calls it between units of work
  and returns early when it is set;
* ``trainer.progress``: ``trainer.progress.note(text)`` and
  ``trainer.progress.phase(name, total)`` for a progress display of a long phase.

Hook order in one run::

    on_run_start                            model built and on its device (weights restored on --resume)
    on_checkpoint_load                      (only with --resume, after the callbacks' state was loaded)
    repeat train.steps times:
        repeat train.grad_accum times:
            on_micro_batch_start(mb)        mb.x, mb.y, mb.mask: this micro-batch (b, T)
            on_micro_batch_end(mb)          + mb.loss (detached), mb.aux
        on_optimizer_step(step)             after optimizer.step(); step = optimizer steps done; the
                                            step's (accumulated, clipped) gradients are still set
        on_evaluate(step, metrics)          when the trainer evaluated (rank 0)
        on_checkpoint_save(path)            when a checkpoint was written (rank 0)
    on_train_end                            after the loop and its final checkpoint: post-training
                                            phases (planner fit, probes) run here, status known
    on_run_end                              always last (also after an error: status "failed")

State: ``state_dict()`` returns a flat mapping of names to tensors or JSON values (numbers,
strings, lists, dicts). Tensors are written to the checkpoint's safetensors file, the rest
to its JSON file (no pickle); ``load_state_dict`` receives the same mapping back, tensors on
the CPU. A callback's state is stored under its ``name``, which must be unique in a run.

Components contribute callbacks by defining ``training_callbacks(self) -> list[Callback]``
on any ``nn.Module`` inside the model (return the same objects on every call; keep the
callback a separate object, since ``nn.Module`` has its own ``state_dict``). They are named
``<module path>:<name>`` (``backbone:schedule``, ``regularizers.1:ewc``); their state is saved
with every checkpoint, the weights-only ``best/`` included, and restored when a checkpoint is
loaded (``statelab.load``, ``--resume``, ``statelab probe``). Under DDP every rank runs every
callback; the trainer's own evaluation and saving happen on rank 0 (``trainer.is_main``). A third-party distribution registers named callbacks
with the ``statelab_callbacks`` pluggy hook (:class:`statelab.plugins.CallbackEntry`); a run
uses the ones its spec lists in ``train.callbacks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

__all__ = ["Callback", "CallbackList", "MicroBatch", "component_callbacks"]


@dataclass
class MicroBatch:
    """One micro-batch of an optimizer step (``grad_accum`` of them make a step).

    ``index``: 0 .. grad_accum - 1; ``x``, ``y`` ``(b, T)`` token ids and targets, ``mask``
    ``(b, T)`` or ``None``; after the backward pass ``loss`` (scalar, detached, unscaled)
    and ``aux`` (the published internals of the forward) are set."""

    index: int
    x: Tensor
    y: Tensor
    mask: Tensor | None
    loss: Tensor | None = None
    aux: Mapping[str, Any] | None = None


class Callback:
    """Base class of training-time callbacks; see the module docstring for the hook order.

    ``name`` keys the callback's state in checkpoints (unique per run); ``order`` sorts
    callbacks (lower runs first; the trainer's own use 0-100, components default to 50).
    """

    name: str = ""
    order: int = 50

    def on_run_start(self, trainer: Any) -> None:
        """The run is set up: model built and on its device (weights restored on --resume)."""

    def on_micro_batch_start(self, trainer: Any, mb: MicroBatch) -> None:
        """Before the forward pass of one micro-batch (the model is in training mode)."""

    def on_micro_batch_end(self, trainer: Any, mb: MicroBatch) -> None:
        """After the backward pass of one micro-batch; ``mb.loss`` and ``mb.aux`` are set."""

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        """After ``optimizer.step()``; ``step`` is the number of optimizer steps done (1, 2, ...).
        The step's gradients are still set (they are zeroed after every callback ran)."""

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        """After an evaluation at ``step`` (rank 0); ``metrics`` holds the ``val/*`` values."""

    def on_checkpoint_save(self, trainer: Any, path: Any) -> None:
        """A checkpoint (with this callback's ``state_dict``) was written to ``path`` (rank 0)."""

    def on_checkpoint_load(self, trainer: Any, path: Any) -> None:
        """``--resume``: the trainer restored its state and this callback's from ``path``."""

    def on_train_end(self, trainer: Any) -> None:
        """The optimisation loop ended (``trainer.status`` says how) and its checkpoint is written."""

    def on_run_end(self, trainer: Any) -> None:
        """Last hook of a run, also after an error (``trainer.status == "failed"``)."""

    def state_dict(self) -> dict[str, Any]:
        """Flat mapping of names to tensors or JSON values; saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors arrive on the CPU)."""


HOOKS = ("on_run_start", "on_micro_batch_start", "on_micro_batch_end", "on_optimizer_step", "on_evaluate",
         "on_checkpoint_save", "on_checkpoint_load", "on_train_end", "on_run_end")

#: separates a callback's name from a key of its state in a checkpoint's tensor file
SEP = "::"


class CallbackList:
    """The callbacks of one run by state name, sorted by ``order`` (stable); each hook is
    dispatched only to the callbacks that override it, so an unused hook costs nothing."""

    def __init__(self, named: Mapping[str, Callback]) -> None:
        for name, cb in named.items():
            if not isinstance(cb, Callback):
                raise TypeError(f"callback {name!r} is a {type(cb).__name__}, not a statelab.Callback")
            if not name or SEP in name:
                raise ValueError(f"callback name {name!r}: give it a non-empty name without {SEP!r}")
        self.named = dict(sorted(named.items(), key=lambda kv: kv[1].order))
        self._hooks = {
            hook: [getattr(cb, hook) for cb in self.named.values() if getattr(type(cb), hook) is not getattr(Callback, hook)]
            for hook in HOOKS
        }

    def has(self, hook: str) -> bool:
        return bool(self._hooks[hook])

    def call(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(*args)

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: dict(cb.state_dict()) for name, cb in self.named.items()}

    def load_state(self, js: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        """Give each callback the state saved under its name (callbacks with none get no call)."""
        for name, cb in self.named.items():
            state = join_state(js, tensors, name)
            if state is not None:
                cb.load_state_dict(state)


def split_state(states: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """``{name: {key: tensor | JSON value}}`` -> JSON part and tensors keyed ``name::key``."""
    js: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for name, state in states.items():
        part = js.setdefault(name, {})
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{name}{SEP}{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                part[key] = value
    return js, tensors


def join_state(js: Mapping[str, Any], tensors: Mapping[str, Tensor], name: str) -> dict[str, Any] | None:
    """The state saved under ``name`` (the inverse of :func:`split_state`); ``None`` when absent."""
    if name not in js:
        return None
    state = dict(js[name])
    prefix = f"{name}{SEP}"
    state.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return state


def component_callbacks(model: Any) -> dict[str, Callback]:
    """Callbacks contributed by the model's modules (``training_callbacks()``), named
    ``<module path>:<callback name>`` (e.g. ``backbone:crystallization``)."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    out: dict[str, Callback] = {}
    for path, module in raw.named_modules():
        contribute = getattr(module, "training_callbacks", None)
        if contribute is None:
            continue
        for cb in contribute():
            out[f"{path or 'model'}:{cb.name or type(cb).__name__}"] = cb
    return out
