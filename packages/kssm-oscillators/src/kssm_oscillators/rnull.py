"""The finite-N random-phase null for order parameters.

For ``n`` independent phases uniform on the circle, ``Z = mean_j e^{i k theta_j}`` (any
harmonic ``k >= 1``: ``k theta`` is uniform too) has ``E|Z|^2 = 1 / n``; for moderate ``n``
``sqrt(n) R`` is close to Rayleigh with ``sigma^2 = 1/2``, so

    E[R] ~ sqrt(pi) / (2 sqrt(n))        sd[R] ~ sqrt((4 - pi) / (4 n))

(64 oscillators: E[R] ~ 0.111). The null is also sampled exactly (:func:`sample_null_r`),
which is what the comparisons use; the analytic values are reported beside it. An order
parameter whose distribution matches this null is "at the incoherent level": the oscillators
of that group look like random phases, whatever zones R happens to visit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from statelab import stats


def expected_r(n: int) -> float:
    """Large-n mean of R for ``n`` uniform random phases: ``sqrt(pi) / (2 sqrt(n))``."""
    return math.sqrt(math.pi) / (2.0 * math.sqrt(n))


def expected_r_sd(n: int) -> float:
    """Large-n standard deviation of R for ``n`` uniform random phases."""
    return math.sqrt((4.0 - math.pi) / (4.0 * n))


def sample_null_r(n: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """R of ``n`` uniform random phases, one value per entry of ``shape``."""
    theta = (torch.rand(*shape, n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    return torch.sqrt(torch.cos(theta).mean(-1) ** 2 + torch.sin(theta).mean(-1) ** 2).float()


def group_size(layer, group_index: int) -> int:
    """Oscillators per group of entry ``group_index`` of a :class:`~kssm_oscillators.kssm.KuramotoLayer`'s
    order parameters (entries are the groups of ``group_levels`` one level after the other)."""
    start = 0
    for g in layer.group_levels:
        if group_index < start + g:
            return layer.N // g
        start += g
    raise ValueError(f"group index {group_index} is out of range: the layer has {start} groups ({layer.group_levels})")


def compare_to_null(values: Tensor, n: int, *, margin: float = 0.25, seed: int = 0, level: float = 0.95) -> dict:
    """Compare R values ``(n_batches, M)`` with random phases of ``n`` oscillators.

    The null is sampled with the same shape; per batch, R's mean and its sd are differenced
    with the null's (paired by batch, interval over batches). Verdict:

    * ``constant``: R does not move at all (sd below 1e-6);
    * ``at null``: both differences lie inside ``+-margin`` of the null's mean and sd (the
      incoherent level: random phases would look the same);
    * ``above null`` / ``below null``: R's mean is outside that band, on that side
      (synchronised / more evenly spread than chance);
    * ``varies``: the mean is at the null level but R spreads more than random phases do.
    """
    values = values.detach().float().reshape(values.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    null = sample_null_r(n, tuple(values.shape), g)
    mean_d = stats.paired_difference(values.mean(1).tolist(), null.mean(1).tolist(), higher_is_better=True, level=level)
    sd_d = stats.paired_difference(values.std(1).tolist(), null.std(1).tolist(), higher_is_better=True, level=level)
    null_mean, null_sd = float(null.mean()), float(null.std())
    out = {
        "R_mean": float(values.mean()), "R_sd": float(values.std()),
        "null_R_mean": null_mean, "null_R_sd": null_sd,
        "null_R_mean_analytic": expected_r(n), "null_R_sd_analytic": expected_r_sd(n), "group_size": n,
        "mean_vs_null": mean_d, "sd_vs_null": sd_d,
    }

    def inside(d: stats.PairedDifference, scale: float) -> bool:
        lo, hi = d.diff.low, d.diff.high
        if math.isnan(lo):  # one batch: judge the point estimate
            lo = hi = d.diff.mean
        return -margin * scale <= lo and hi <= margin * scale

    if float(values.std()) < 1e-6:
        out["verdict"] = "constant"
    elif not inside(mean_d, null_mean):
        out["verdict"] = "above null" if mean_d.diff.mean > 0 else "below null"
    elif not inside(sd_d, null_sd) and sd_d.diff.mean > 0:
        out["verdict"] = "varies"
    else:
        out["verdict"] = "at null"
    return out


__all__ = ["compare_to_null", "expected_r", "expected_r_sd", "group_size", "sample_null_r"]
