"""Controls that judge a planner's injections: wrappers of a plan function that keep the plan's
timing, gate and the length of its move and replace only the move's direction.

A plan's *move* is ``target - snapshot`` over the flat injectable state ``(B, S)`` (the codec's
layout); the generation hook rebases it onto the state it is applied to (``target_frame``).
Each control returns the snapshot moved by another direction of the same length per row
(or of ``norm`` times the snapshot's length, when ``norm`` is given, for every setting alike):

* :func:`subspace_random_plan` -- a random direction in the span of the planner's decoder,
  the only directions the planner can ever propose: the matched null.
* :func:`oracle_plan` -- the positive control. It knows the text: the direction of steepest
  descent of the backbone's loss on the true next ``horizon`` tokens, taken at the state the
  result will be applied to (the snapshot pushed forward with the backbone's own step through
  the ``lag`` tokens actually read in between). What an injection of this length could gain.
* :func:`future_state_plan` -- toward the state the backbone reaches after reading the true
  next ``horizon`` tokens (what the planner's targets imitate with a perfect world model and a
  known continuation). Reported beside the oracle: on the toys it does not help (a state
  that has read ahead predicts the tokens after those it should predict).

The oracles run on teacher-forced windows ``tokens (B, T)``: the request at step ``t`` is made
from the state after ``tokens[:, t]``; they recompute the un-injected states from the window.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from statelab.interfaces import PlanRequest, PlanResult

PlanFn = Callable[[Any, PlanRequest], PlanResult]


def _move(planner, request: PlanRequest, r: PlanResult) -> tuple[Tensor, Tensor]:
    """``(snapshot (B, S), planned move (B, S))`` of a plan."""
    codec = planner.codec
    snap = r.info.get("snapshot_flat")
    if snap is None:
        snap = codec.flatten(request.state)
    return snap, codec.flatten(r.target) - snap


def _result(planner, request: PlanRequest, r: PlanResult, snap: Tensor, move: Tensor) -> PlanResult:
    target_flat = snap + move  # (B, S)
    info = {k: v for k, v in r.info.items() if k not in ("target_flat", "snapshot_flat")}
    info.update(target_flat=target_flat, snapshot_flat=snap)
    return PlanResult(planner.codec.unflatten(target_flat, request.state), r.confidence, r.alpha, r.step,
                      r.generation_id, info)


def _scaled(direction: Tensor, length: Tensor) -> Tensor:
    """``direction (B, S)`` rescaled to ``length (B, 1)`` per row."""
    return direction * (length / direction.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _length(snap: Tensor, move: Tensor, norm: float | None) -> Tensor:
    return move.norm(dim=1, keepdim=True) if norm is None else norm * snap.norm(dim=1, keepdim=True)  # (B, 1)


def rescaled_plan(planner, plan_fn: PlanFn, norm: float | None) -> PlanFn:
    """The plan itself, its move rescaled to ``norm`` times the snapshot's length (None: as planned)."""

    def plan(model, request: PlanRequest) -> PlanResult:
        r = plan_fn(model, request)
        snap, move = _move(planner, request, r)
        return _result(planner, request, r, snap, _scaled(move, _length(snap, move, norm)))

    return plan


def subspace_random_plan(planner, plan_fn: PlanFn, seed: int, norm: float | None = None) -> PlanFn:
    """A random direction in the decoder's column space (``D z`` for ``z ~ N(0, I)``, in raw
    state units) instead of the planned one."""
    g = torch.Generator().manual_seed(seed)

    def plan(model, request: PlanRequest) -> PlanResult:
        r = plan_fn(model, request)
        snap, move = _move(planner, request, r)
        z = torch.randn(snap.shape[0], planner.codec.d_latent, generator=g).to(snap.device)  # (B, L)
        direction = planner.codec.decode_delta(z, torch.zeros_like(z))  # (B, S)
        return _result(planner, request, r, snap, _scaled(direction, _length(snap, move, norm)))

    return plan


class _Window:
    """The un-injected full states of a teacher-forced window (computed once, on first use)."""

    def __init__(self, model, tokens: Tensor) -> None:
        self.model, self.tokens = model, tokens
        self.states: list[dict[str, Tensor]] | None = None

    def state_after(self, t: int) -> dict[str, Tensor]:
        if self.states is None:
            with torch.no_grad():
                state = self.model.init_state(self.tokens.shape[0], self.tokens.device)
                self.states = []
                for i in range(self.tokens.shape[1]):
                    _, state, _ = self.model.step(self.tokens[:, i], state)
                    self.states.append(state)
        return self.states[t]


def oracle_plan(planner, plan_fn: PlanFn, tokens: Tensor, *, lag: int, horizon: int,
                norm: float | None = None) -> PlanFn:
    """Steepest descent of the loss on the true next ``horizon`` tokens ``tokens (B, T)`` at the
    state the plan will be applied to, ``lag`` steps after its snapshot."""
    window = _Window(None, tokens)  # the model comes with the first request
    keys = planner.codec.keys

    def plan(model, request: PlanRequest) -> PlanResult:
        r = plan_fn(model, request)
        snap, move = _move(planner, request, r)
        window.model = model
        u = request.step + lag  # applied after tokens[:, u]
        ahead = tokens[:, u + 1 : u + 1 + horizon]  # (B, <=h) read after the injection
        if u >= tokens.shape[1] or ahead.shape[1] < 2:
            return _result(planner, request, r, snap, torch.zeros_like(move))  # nothing left to score
        st = {k: v.detach().clone().requires_grad_(k in keys) for k, v in window.state_after(u).items()}
        with torch.enable_grad():
            logits, _, _ = model(ahead[:, :-1], st)  # (B, h-1, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ahead[:, 1:].flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, [st[k] for k in keys])
        direction = -torch.cat([gr.reshape(gr.shape[0], -1).float() for gr in grads], dim=1)  # (B, S)
        return _result(planner, request, r, snap, _scaled(direction, _length(snap, move, norm)))

    return plan


def future_state_plan(planner, plan_fn: PlanFn, tokens: Tensor, *, lag: int, horizon: int,
                      norm: float | None = None) -> PlanFn:
    """Toward the state after reading the true next ``horizon`` tokens, from the state the plan
    will be applied to."""
    window = _Window(None, tokens)

    def plan(model, request: PlanRequest) -> PlanResult:
        r = plan_fn(model, request)
        snap, move = _move(planner, request, r)
        window.model = model
        u = request.step + lag
        end = min(u + horizon, tokens.shape[1] - 1)
        if end <= u:
            return _result(planner, request, r, snap, torch.zeros_like(move))
        codec = planner.codec
        direction = codec.flatten(window.state_after(end)) - codec.flatten(window.state_after(u))  # (B, S)
        return _result(planner, request, r, snap, _scaled(direction, _length(snap, move, norm)))

    return plan
