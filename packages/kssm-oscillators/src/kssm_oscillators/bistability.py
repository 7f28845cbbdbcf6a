"""K-SSM v3's algebraic bistability constraints, and the `bistability` regularizer.

The ten parameters ``[a, b, c, d, e, f, g, h, i, j]`` are read from a layer's hidden state.
They are the coefficients of the prototype's three-equation system

    a x^2 + b y + c z = d
    e x^2 + f y + g z = h
    i x^2 + j y +   z = 0

Eliminating ``z`` from the first two equations gives ``(a g - c e) x^2 + Delta y = d g - c h``;
the prototype's reduced variable is its ``y = 0`` solution for ``u = x^2``:

    u     = (d g - c h) / (a g - c e)      two real equilibria x = +-sqrt(u) exist iff u > 0
    Delta = b g - c f                      the (y, z) subsystem is invertible iff Delta != 0

``i`` and ``j`` belong to the framework but enter neither ``u`` nor ``Delta`` (as in the
prototype); they are computed and left unused.

Guards, so that nothing is ever NaN or infinite whatever the hidden state:

* the ten parameters are soft-bounded, ``p <- s * tanh(p / s)`` (``s = param_scale``), so
  every product above is at most ``s^2``;
* the denominator is pushed away from zero keeping its sign: ``|den| >= den_eps``;
* ``u`` is clamped to ``[u_min, u_max]`` (default ``[0.1, 10]``) unless the ablation
  turns the clamp off, in which case ``|u| <= 2 s^2 / den_eps`` still holds.

The clamp's gradient (``clamp_gradient``): ``hard`` is the prototype's ``clamp``, whose
gradient is exactly 0 outside the bounds, so a ``u`` stuck at 0.1 never feels the barrier
(a 300-step CPU run had 99.9% of layer-1 positions there, the coupling effectively off);
``straight-through`` (default) keeps the clamped value forward but, at a bound, passes the
gradient to the raw ``u`` when descending it moves ``u`` back inside (up at ``u_min``, down
at ``u_max``) and blocks it otherwise: the barrier acts at the lower clamp and moves ``u``
off it, while nothing pushes the raw ``u`` further out (passing every gradient lets the
barrier drive ``u_raw`` through the upper bound until its denominator changes sign).

The regularizer is the prototype's log barrier ``-log(u + eps)`` averaged over every site
that publishes ``kssm.u``. On its own the barrier pushes ``u`` up. With the clamp off, ``u`` can be negative and
the barrier is evaluated at ``max(u, 0)`` (a floor: finite, no gradient below zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

from statelab.interfaces import Aux, Regularizer
from statelab.internals import select

from kssm_oscillators.rnull import expected_r

#: names of the ten parameters, in the order a linear map produces them
PARAM_NAMES = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")

#: a bias for the ten-parameter map that starts every layer at u = 1 and Delta = 1
#: (a = b = d = g = 1, the rest 0): the middle of the clamp, an invertible subsystem.
INIT_BIAS = (1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)


def guard_denominator(den: Tensor, eps: float) -> Tensor:
    """``den`` with ``|den| >= eps``, keeping its sign (zero counts as positive)."""
    return torch.where(den >= 0, den.clamp_min(eps), den.clamp_max(-eps))


class _InwardClamp(torch.autograd.Function):
    """``clamp(x, lo, hi)`` forward; backward passes the gradient inside the bounds, and at a
    bound only when gradient descent moves ``x`` back inside."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # descent moves x by -grad: inward at the lower bound when grad < 0, at the upper when grad > 0
        keep = ((x >= ctx.lo) & (x <= ctx.hi)) | ((x < ctx.lo) & (grad < 0)) | ((x > ctx.hi) & (grad > 0))
        return grad * keep, None, None


def bistable_terms(
    params: Tensor,
    *,
    clamp: bool = True,
    u_min: float = 0.1,
    u_max: float = 10.0,
    den_eps: float = 1e-3,
    param_scale: float = 4.0,
    clamp_gradient: str = "straight-through",
) -> tuple[Tensor, Tensor, Tensor]:
    """``params (..., 10)`` -> ``(u, u_raw, delta)``, each ``(...)``; always finite.

    ``u`` is ``u_raw`` clamped to ``[u_min, u_max]`` when ``clamp`` (the v3 architecture),
    else ``u_raw`` itself (the ablation). ``clamp_gradient``: ``"hard"`` (zero gradient outside
    the bounds) or ``"straight-through"`` (outside the bounds, the gradient of ``u_raw`` when
    descent moves it back inside).
    """
    if clamp_gradient not in ("hard", "straight-through"):
        raise ValueError(f"clamp_gradient {clamp_gradient!r}: choose 'hard' or 'straight-through'")
    if params.shape[-1] != 10:
        raise ValueError(f"bistable_terms: expected 10 parameters [a..j] in the last dim, got shape {tuple(params.shape)}")
    p = param_scale * torch.tanh(params / param_scale)  # (..., 10), each in (-s, s)
    a, b, c, d, e, f, g, h, _i, _j = p.unbind(-1)
    num = d * g - c * h
    den = guard_denominator(a * g - c * e, den_eps)
    u_raw = num / den
    u = u_raw
    if clamp:
        u = _InwardClamp.apply(u_raw, u_min, u_max) if clamp_gradient == "straight-through" else u_raw.clamp(u_min, u_max)
    delta = b * g - c * f
    return u, u_raw, delta


def log_barrier(u: Tensor, eps: float) -> Tensor:
    """``-log(max(u, 0) + eps)`` elementwise: the prototype's barrier, finite for any ``u``."""
    return -torch.log(u.clamp_min(0.0) + eps)


class BistabilityRegularizer(Regularizer):
    """``mean_sites mean(-log(u + eps))`` over every ``kssm.u``, plus optionally
    ``delta_weight * mean(-log(|Delta| + eps))`` keeping ``Delta`` away from zero.

    Metrics (detached scalars): u's mean, std, min, max and the fraction of positions at a
    clamp bound; ``|Delta|`` mean; and, when the model publishes ``kssm.R``, R's mean and std
    over every entry, the whole population's R of harmonic 1 (``R_global_mean``) and its
    random-phase level (``R_global_null``): what ``statelab monitor``'s kssm preset watches.
    """

    def __init__(self, eps: float = 1e-4, delta_weight: float = 0.0, u_bounds: tuple[float, float] = (0.1, 10.0)) -> None:
        super().__init__()
        self.eps = eps
        self.delta_weight = delta_weight
        self.u_bounds = u_bounds
        self.requires = ("kssm.u", "kssm.delta") if delta_weight > 0 else ("kssm.u",)

    def forward(self, aux: Aux, model=None) -> tuple[Tensor, dict[str, Tensor]]:
        us = list(select(aux, "kssm.u").values())
        if not us:
            raise KeyError(
                "bistability regularizer: no 'kssm.u' in the model's internals; it needs the 'kssm' backbone "
                f"(internals present: {sorted(aux) or 'none'})"
            )
        loss = torch.stack([log_barrier(u.float(), self.eps).mean() for u in us]).mean()
        flat_u = torch.cat([u.detach().float().reshape(-1) for u in us])
        lo, hi = self.u_bounds
        metrics: dict[str, Tensor] = {
            "u_mean": flat_u.mean(),
            "u_std": flat_u.std(unbiased=False),
            "u_min": flat_u.min(),
            "u_max": flat_u.max(),
            "u_at_bound": ((flat_u <= lo) | (flat_u >= hi)).float().mean(),
        }
        deltas = list(select(aux, "kssm.delta").values())
        if deltas:
            flat_d = torch.cat([d.detach().float().reshape(-1) for d in deltas])
            metrics["delta_abs_mean"] = flat_d.abs().mean()
            if self.delta_weight > 0:
                d_loss = torch.stack([-torch.log(d.float().abs() + self.eps).mean() for d in deltas]).mean()
                loss = loss + self.delta_weight * d_loss
        rs = list(select(aux, "kssm.R").values())
        if rs:
            flat_r = torch.cat([r.detach().float().reshape(-1) for r in rs])
            metrics["R_mean"] = flat_r.mean()
            metrics["R_std"] = flat_r.std(unbiased=False)
            # entry [0, 0]: the whole population's R of harmonic 1 (group_levels start with 1),
            # beside its random-phase level sqrt(pi) / (2 sqrt(N)) (N from the published phases)
            full = [r for r in rs if r.dim() == 4]  # (B, T, G, K)
            if full:
                metrics["R_global_mean"] = torch.stack([r.detach()[..., 0, 0].float().mean() for r in full]).mean()
            thetas = list(select(aux, "kssm.theta").values())
            if full and thetas:
                metrics["R_global_null"] = torch.tensor(expected_r(thetas[0].shape[-1]))
        return loss, metrics


def build_regularizer(params, ctx) -> BistabilityRegularizer:
    return BistabilityRegularizer(eps=params.eps, delta_weight=params.delta_weight)
