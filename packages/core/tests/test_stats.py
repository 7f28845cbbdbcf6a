"""statelab.stats against cases computed by hand (t table values from standard tables)."""

import math

import pytest

from statelab import stats


def test_t_interval_five_values():
    # mean 3, sd sqrt(2.5), t_{4,0.975} = 2.776445 -> half width 2.776445 * 1.581139 / 2.236068
    iv = stats.interval([1, 2, 3, 4, 5])
    assert iv.mean == 3.0 and iv.n == 5
    assert iv.sd == pytest.approx(math.sqrt(2.5))
    assert iv.half_width == pytest.approx(1.963243, abs=1e-5)
    assert (iv.low, iv.high) == (pytest.approx(1.036757, abs=1e-5), pytest.approx(4.963243, abs=1e-5))
    assert str(iv) == "3.000 [1.037, 4.963]"


def test_t_interval_two_values_uses_one_degree_of_freedom():
    # t_{1,0.975} = 12.7062; sd = sqrt(2), sqrt(n) = sqrt(2) -> half width 12.7062
    iv = stats.interval([2.0, 4.0])
    assert iv.half_width == pytest.approx(12.7062, abs=1e-3)
    assert stats.t_critical(2) == pytest.approx(12.7062, abs=1e-3)
    assert stats.t_critical(31, level=0.90) == pytest.approx(1.6973, abs=1e-3)


def test_single_value_has_no_interval():
    iv = stats.interval([0.7])
    assert iv.mean == 0.7 and iv.n == 1 and math.isnan(iv.low) and math.isnan(iv.high)
    assert not iv.excludes(0.0)
    assert str(iv) == "0.700 (n=1)"


def test_bootstrap_two_values_percentiles():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4:
    # the 2.5% and 97.5% quantiles are 0 and 1.
    iv = stats.interval([0.0, 1.0], method="bootstrap", n_boot=4000)
    assert (iv.low, iv.high) == (0.0, 1.0)
    assert iv.method == "bootstrap"
    const = stats.interval([3.0, 3.0, 3.0], method="bootstrap")
    assert (const.low, const.high) == (3.0, 3.0)


def test_bootstrap_close_to_t_for_many_normal_values():
    import numpy as np

    x = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    t, b = stats.interval(x), stats.interval(x, method="bootstrap", seed=3)
    assert b.low == pytest.approx(t.low, abs=0.05) and b.high == pytest.approx(t.high, abs=0.05)
    assert stats.interval(x, method="bootstrap", seed=3) == b  # reproducible


def test_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        stats.interval([])
    with pytest.raises(ValueError, match="finite"):
        stats.interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="unknown interval method"):
        stats.interval([1.0, 2.0], method="z")


def test_paired_difference_better_and_worse():
    cand = {0: 0.90, 1: 0.80, 2: 0.85}
    base = {0: 0.50, 1: 0.55, 2: 0.45}
    # diffs 0.40, 0.25, 0.40: mean 0.35, sd sqrt(0.0075), t_{2} = 4.302653 -> half 0.215133
    p = stats.paired_difference(cand, base, higher_is_better=True)
    assert p.diff.mean == pytest.approx(0.35)
    assert (p.diff.low, p.diff.high) == (pytest.approx(0.134867, abs=1e-5), pytest.approx(0.565133, abs=1e-5))
    assert p.verdict == stats.BETTER
    # the same numbers as a loss (lower is better) make the candidate worse
    assert stats.paired_difference(cand, base, higher_is_better=False).verdict == stats.WORSE
    assert p.format() == "+0.350 [+0.135, +0.565] better"


def test_paired_difference_no_detectable_difference():
    # diffs 1, -1, 0.5: mean 1/6, interval straddles 0
    p = stats.paired_difference([2.0, 0.0, 1.5], [1.0, 1.0, 1.0], higher_is_better=True)
    assert p.diff.mean == pytest.approx(1 / 6)
    assert p.diff.low < 0 < p.diff.high
    assert p.verdict == stats.NO_DIFFERENCE


def test_paired_difference_pairs_by_key_and_needs_two_for_a_verdict():
    # keys 1 and 2 only are shared; the difference is exactly +1 on both -> zero spread
    p = stats.paired_difference({0: 9.0, 1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0, 3: 0.0}, higher_is_better=True)
    assert p.keys == (1, 2) and p.diff.mean == 1.0 and p.diff.low == p.diff.high == 1.0
    assert p.verdict == stats.BETTER
    # one pair: a large difference but no spread to judge -> no verdict
    one = stats.paired_difference({0: 5.0}, {0: 1.0}, higher_is_better=True)
    assert one.verdict == stats.NO_DIFFERENCE and "n=1" in one.format()
    with pytest.raises(ValueError, match="no shared keys"):
        stats.paired_difference({0: 1.0}, {1: 1.0}, higher_is_better=True)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1.0, 2.0], [1.0], higher_is_better=True)


def test_best_over_grid_selects_on_mean_over_seeds():
    rows = [
        # lr 1e-3 has the single best seed (0.95) but the worse mean (0.525)
        {"model": "a", "lr": 1e-3, "seed": 0, "acc": 0.95},
        {"model": "a", "lr": 1e-3, "seed": 1, "acc": 0.10},
        {"model": "a", "lr": 3e-3, "seed": 0, "acc": 0.70},
        {"model": "a", "lr": 3e-3, "seed": 1, "acc": 0.70},
        {"model": "b", "lr": 1e-3, "seed": 0, "acc": 0.20},
        {"model": "b", "lr": 3e-3, "seed": 0, "acc": 0.40},
    ]
    best = stats.best_over_grid(rows, metric="acc", grid="lr", group="model")
    assert best["a"].best == 3e-3 and best["a"].interval.mean == pytest.approx(0.70)
    assert best["a"].interval.low == best["a"].interval.high == pytest.approx(0.70)
    assert best["a"].per_value[1e-3].mean == pytest.approx(0.525)
    assert best["b"].best == 3e-3 and best["b"].interval.n == 1
    # as a loss, the lowest mean wins
    low = stats.best_over_grid(rows, metric="acc", grid="lr", group=lambda r: r["model"], higher_is_better=False)
    assert low["a"].best == 1e-3 and low["b"].best == 1e-3
