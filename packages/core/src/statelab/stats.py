"""Statistics for comparisons, done once: intervals over seeds, best over a grid, paired differences.

Everything here works on plain numbers (one value per seed, per batch or per row) and returns
small frozen dataclasses that print as ``mean [low, high]``:

* :func:`interval` -- mean and 95% interval of a sample, by Student's t or by a percentile
  bootstrap.
* :func:`best_over_grid` -- Zoology's protocol for a learning-rate sweep: per configuration,
  the grid value whose mean over seeds is best, reported with that value's interval.
* :func:`paired_difference` -- the difference against a baseline paired by seed (or batch),
  with an interval and a three-way verdict: ``better``, ``worse`` or
  ``no detectable difference``. The verdict is read off the interval (does it exclude 0, and on
  which side), never off a p-value, so a deterministic model cannot produce a significant
  result by sitting at a permutation floor.

With one value there is no spread to estimate: the interval is ``(nan, nan)`` and a paired
verdict is ``no detectable difference``; the report says ``n=1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Method = Literal["t", "bootstrap"]

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference"
VERDICTS = (BETTER, WORSE, NO_DIFFERENCE)


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval.

    ``low``/``high`` are ``nan`` when ``n < 2`` (no spread to estimate). ``sd`` is the sample
    standard deviation (ddof=1; 0.0 for n=1).
    """

    mean: float
    low: float
    high: float
    n: int
    sd: float
    level: float = 0.95
    method: str = "t"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies entirely on one side of ``value``."""
        return (not math.isnan(self.low)) and (self.low > value or self.high < value)

    def format(self, digits: int = 3) -> str:
        if self.n < 2 or math.isnan(self.low):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "sd": self.sd,
            "level": self.level,
            "method": self.method,
        }

    def __str__(self) -> str:
        return self.format()


def _sample(values: Iterable[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("an interval needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x.tolist()}")
    return x


def t_critical(n: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value with ``n - 1`` degrees of freedom."""
    from scipy import stats as _st

    return float(_st.t.ppf(0.5 + level / 2, n - 1))


def interval(
    values: Iterable[float],
    *,
    level: float = 0.95,
    method: Method = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean and ``level`` interval of ``values``.

    ``method="t"``: ``mean +- t_{n-1} * sd / sqrt(n)`` (exact for normal data; the default,
    right for a handful of seeds). ``method="bootstrap"``: percentile bootstrap of the mean with
    ``n_boot`` resamples drawn from a generator seeded with ``seed`` (reproducible; better for
    many skewed values such as per-batch losses, poor for n < 10).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _sample(values)
    n = int(x.size)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, 0.0, level, method)
    sd = float(x.std(ddof=1))
    if method == "t":
        h = t_critical(n, level) * sd / math.sqrt(n)
        return Interval(mean, mean - h, mean + h, n, sd, level, "t")
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        means = x[idx].mean(axis=1)
        alpha = (1 - level) / 2
        low, high = np.quantile(means, [alpha, 1 - alpha])
        return Interval(mean, float(low), float(high), n, sd, level, "bootstrap")
    raise ValueError(f"unknown interval method {method!r}; use 't' or 'bootstrap'")


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - baseline`` paired by key, with its interval and verdict.

    ``verdict`` is :data:`BETTER` when the interval excludes 0 on the good side (above 0 when
    higher is better, below when lower is), :data:`WORSE` on the other side, else
    :data:`NO_DIFFERENCE`.
    """

    diff: Interval
    verdict: str
    higher_is_better: bool
    keys: tuple

    def format(self, digits: int = 3) -> str:
        d = self.diff
        if d.n < 2 or math.isnan(d.low):
            return f"{d.mean:+.{digits}f} (n={d.n}) {self.verdict}"
        return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}] {self.verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "diff": self.diff.to_dict(),
            "verdict": self.verdict,
            "higher_is_better": self.higher_is_better,
            "keys": list(self.keys),
        }

    def __str__(self) -> str:
        return self.format()


def verdict(diff: Interval, *, higher_is_better: bool) -> str:
    """Three-way verdict from the interval of ``candidate - baseline``."""
    if not diff.excludes(0.0):
        return NO_DIFFERENCE
    above = diff.low > 0
    return BETTER if above == higher_is_better else WORSE


def paired_difference(
    candidate: Mapping[Hashable, float] | Sequence[float],
    baseline: Mapping[Hashable, float] | Sequence[float],
    *,
    higher_is_better: bool,
    level: float = 0.95,
    method: Method = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Paired ``candidate - baseline`` with an interval and a verdict.

    Mappings are paired by key (seed, batch index); only keys present in both count, and at
    least one must be shared. Sequences are paired by position and must have equal length.
    """
    if isinstance(candidate, Mapping) != isinstance(baseline, Mapping):
        raise TypeError("candidate and baseline must both be mappings or both be sequences")
    if isinstance(candidate, Mapping):
        keys = tuple(k for k in candidate if k in baseline)
        if not keys:
            raise ValueError(
                f"no shared keys to pair: candidate has {sorted(map(str, candidate))}, "
                f"baseline has {sorted(map(str, baseline))}"
            )
        d = [float(candidate[k]) - float(baseline[k]) for k in keys]
    else:
        if len(candidate) != len(baseline):
            raise ValueError(
                f"paired sequences need equal lengths, got {len(candidate)} and {len(baseline)}"
            )
        keys = tuple(range(len(candidate)))
        d = [float(c) - float(b) for c, b in zip(candidate, baseline)]
    iv = interval(d, level=level, method=method, n_boot=n_boot, seed=seed)
    return PairedDifference(iv, verdict(iv, higher_is_better=higher_is_better), higher_is_better, keys)


@dataclass(frozen=True)
class GridBest:
    """The best grid value of one configuration and its interval over seeds."""

    group: Hashable
    best: Hashable
    interval: Interval
    per_value: dict  # grid value -> Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "best": self.best,
            "interval": self.interval.to_dict(),
            "per_value": {str(k): v.to_dict() for k, v in self.per_value.items()},
        }


def best_over_grid(
    rows: Iterable[Mapping[str, Any]],
    *,
    metric: str,
    grid: str,
    group: str | Callable[[Mapping[str, Any]], Hashable],
    higher_is_better: bool = True,
    level: float = 0.95,
    method: Method = "t",
) -> dict[Hashable, GridBest]:
    """Zoology's "best over the learning-rate grid", with seeds.

    ``rows`` are results (dicts), each with the ``metric``, the ``grid`` value (e.g. ``train.lr``)
    and whatever ``group`` reads (a key or a function of the row: model, MQAR cell...). Per
    group, the grid value with the best *mean over its rows* (seeds) wins and is reported with
    its interval. Picking per seed instead would report the maximum of noisy values and bias the
    result upward; picking on the mean is what Zoology does with one seed. The selection is still
    optimistic for the winner, so the report keeps every grid value's interval beside it.
    Ties go to the first grid value seen.
    """
    key = (lambda r: r[group]) if isinstance(group, str) else group
    by_group: dict[Hashable, dict[Hashable, list[float]]] = {}
    for r in rows:
        if metric not in r or grid not in r:
            raise KeyError(f"row {dict(r)} lacks {metric!r} or {grid!r}")
        by_group.setdefault(key(r), {}).setdefault(r[grid], []).append(float(r[metric]))
    out: dict[Hashable, GridBest] = {}
    for g, values in by_group.items():
        per_value = {v: interval(xs, level=level, method=method) for v, xs in values.items()}
        sign = 1.0 if higher_is_better else -1.0
        best = max(per_value, key=lambda v: sign * per_value[v].mean)
        out[g] = GridBest(g, best, per_value[best], per_value)
    return out


__all__ = [
    "BETTER",
    "WORSE",
    "NO_DIFFERENCE",
    "VERDICTS",
    "Interval",
    "PairedDifference",
    "GridBest",
    "interval",
    "t_critical",
    "paired_difference",
    "verdict",
    "best_over_grid",
]
