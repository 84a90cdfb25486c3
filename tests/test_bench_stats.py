"""The verdict statistics of the benchmarks: paired intervals, the slope test, grid edges, convergence."""
import math

import numpy as np
import pytest

from knnsolver.bench.stats import (
    FAILS, HOLDS, OPEN, at_grid_edge, bootstrap_interval, convergence, drift_by_method, late_drift, paired_differences,
    paired_test, slope_test, still_rising, usable,
)


def test_paired_differences_use_seeds_both_methods_ran():
    assert paired_differences({0: 0.9, 1: 0.8, 2: 0.7}, {1: 0.5, 2: 0.75, 3: 0.1}) == pytest.approx([0.3, -0.05])


def test_t_interval_against_the_textbook_formula():
    diffs = [0.010, 0.020, 0.015, 0.030, 0.025]  # mean 0.02, sd 0.0079057
    test = paired_test(diffs)
    half = 2.7764451 * np.std(diffs, ddof=1) / math.sqrt(5)  # t(0.975, df=4) from a table
    assert test.mean == pytest.approx(0.02) and test.low == pytest.approx(0.02 - half, rel=1e-6)
    assert test.high == pytest.approx(0.02 + half, rel=1e-6)
    assert test.effect_size == pytest.approx(0.02 / np.std(diffs, ddof=1))
    # one-sample t = 5.657, df = 4, two-sided: 2 (1 - F(t)) with F(t) = 1/2 + t (1 + 2/(t^2+4)) / (2 sqrt(t^2+4))
    assert test.p_value == pytest.approx(0.00481, abs=5e-5)
    assert test.boot_low <= test.mean <= test.boot_high


@pytest.mark.parametrize("diffs,threshold,expected", [
    ([0.031, 0.028, 0.035, 0.030, 0.029], 0.0, HOLDS),  # clearly above 0
    ([0.031, 0.028, 0.035, 0.030, 0.029], 0.01, HOLDS),  # and above a 1-point margin
    ([0.011, 0.008, 0.015, 0.010, 0.009], 0.02, FAILS),  # clearly below a 2-point margin
    ([-0.02, 0.03, 0.01, -0.01, 0.02], 0.0, OPEN),  # the interval contains 0
    ([0.05], 0.0, OPEN),  # one seed: no interval
    ([], 0.0, OPEN),
])
def test_verdict_of_synthetic_result_sets(diffs, threshold, expected):
    assert paired_test(diffs, threshold).verdict == expected


def test_identical_differences_give_an_exact_interval():
    assert paired_test([0.02, 0.02, 0.02]).verdict == HOLDS
    assert paired_test([0.0, 0.0, 0.0]).verdict == OPEN


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.1, 0.3, 0.2, 0.4, 0.25]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    low, high = bootstrap_interval(values)
    assert low < np.mean(values) < high and low >= min(values) and high <= max(values)
    assert all(math.isnan(v) for v in bootstrap_interval([0.1]))


def _gains(slope, noise, seeds=5, sizes=(10, 20, 50, 100, 500, 5400)):
    rng = np.random.default_rng(1)
    return {s: {n: slope * math.log(n) + 0.04 + noise * rng.normal() for n in sizes} for s in range(seeds)}


def test_slope_test_verdicts():
    shrinking = slope_test(_gains(-0.01, 0.002))  # gain grows as data shrinks: the scarcity claim
    assert shrinking.verdict == HOLDS and shrinking.high < 0 and shrinking.slope == pytest.approx(-0.01, abs=0.002)
    assert slope_test(_gains(+0.01, 0.002)).verdict == FAILS
    assert slope_test(_gains(0.0, 0.03)).verdict == OPEN
    exact = slope_test({0: {10: 0.3, 100: 0.1}, 1: {10: 0.5, 100: 0.3}})
    assert exact.slope == pytest.approx(-0.2 / math.log(10))


def test_grid_edges_and_convergence():
    assert at_grid_edge([0.1, 0.3, 1.0], 1.0) and at_grid_edge([0.1, 0.3, 1.0], 0.1)
    assert not at_grid_edge([0.1, 0.3, 1.0], 0.3)
    c = convergence([(10, 10), (7, 10), (3, 10), (8, 10), (5, 10)])  # epochs 9-10 are the last 20%
    assert (c.runs, c.late, c.ok) == (5, 1, True)
    assert not convergence([(10, 10), (9, 10), (3, 10)]).ok
    assert "1 of 5 final runs" in c.text()


def test_diverged_runs_are_failed_not_averaged():
    runs = [{"summary": {"test_accuracy": 0.9}}, {"summary": {"test_accuracy": 0.1, "diverged": True}}]
    good, failed = usable(runs)
    assert good == runs[:1] and failed == runs[1:]


def test_convergence_tells_a_plateau_from_a_rising_curve():
    """A late best within 0.3 points of the earlier best is a plateau's noise; a larger late gain is still rising."""
    rising = [0.80 + 0.01 * e for e in range(10)]  # best at epoch 10, 2 points above epoch 8's
    flat = [0.85] * 8 + [0.851, 0.852]
    c = convergence([(10, 10), (10, 10), (3, 10)], [rising, flat, rising[:3] + [0.7] * 7])
    assert (c.runs, c.late, c.plateau) == (3, 2, 1) and not c.ok
    assert "1 of those 2 peaked on a plateau" in c.text() and "1 were still rising" in c.text()
    by_method = convergence([(10, 10)] * 3 + [(10, 10)], [rising, rising, rising, flat], ["npairs", "hal", "npairs", "rbf"])
    assert by_method.rising == (("npairs", 2), ("hal", 1))  # the plateau run is not counted as rising
    assert "3 were still rising (npairs 2, hal 1)" in by_method.text()


def test_convergence_reads_curves_evaluated_every_few_epochs():
    """Validation every 3rd epoch leaves NaN between evaluations; a flat curve whose first late epoch was not
    evaluated is still a plateau, and a late gain is still rising."""
    nan = math.nan
    flat = [nan, nan, 0.85, nan, nan, 0.85, nan, nan, 0.851, nan, nan, 0.852]  # the last 20%: epochs 10-12
    up = [nan, nan, 0.80, nan, nan, 0.82, nan, nan, 0.84, nan, nan, 0.86]
    c = convergence([(12, 12), (12, 12)], [flat, up], ["rbf", "npairs"])
    assert (c.late, c.plateau, c.rising) == (2, 1, (("npairs", 1),))
    assert not still_rising(12, 12, flat) and still_rising(12, 12, up)
    assert not still_rising(9, 12, up)  # peaked before the last 20%


def test_a_test_against_a_margin_says_so_beside_its_p_value_and_effect_size():
    """A +0.30-point gain tested against a 1-point margin has a negative d_z: the text must say it is from the margin."""
    against_margin = paired_test([0.002, 0.004, 0.003, 0.0025, 0.0035], threshold=0.01)
    assert against_margin.effect_size < 0 and against_margin.verdict == FAILS
    assert "+0.30 pts [" in against_margin.text() and "(paired t-test of the difference from the +1 pts margin: p=" in (
        against_margin.text())
    plain = paired_test([0.002, 0.004, 0.003, 0.0025, 0.0035])
    assert "(paired t-test: p=" in plain.text() and "margin" not in plain.text()


def test_late_drift_is_the_mean_of_the_last_fifth_minus_the_fifth_before():
    """Ten epochs: the last 20% is epochs 9-10, the 20% before is epochs 7-8; unevaluated (NaN) epochs are
    skipped, and a window with no evaluation gives None. A noisy plateau whose best epoch is the last one
    drifts by about 0, a rising curve by its rise."""
    nan = math.nan
    plateau = [0.70, 0.80, 0.85, 0.86, 0.85, 0.86, 0.87, 0.85, 0.85, 0.875]  # best at epoch 10: "late"
    assert late_drift(plateau) == pytest.approx((0.85 + 0.875) / 2 - (0.87 + 0.85) / 2)
    rising = [0.80 + 0.01 * e for e in range(10)]
    assert late_drift(rising) == pytest.approx(0.02)  # (0.88 + 0.89) / 2 - (0.86 + 0.87) / 2
    every_third = [nan, nan, 0.80, nan, nan, 0.82, nan, nan, 0.84, nan, nan, 0.86]  # windows: epochs 8-9, 10-12
    assert late_drift(every_third) == pytest.approx(0.86 - 0.84)
    assert late_drift([nan, 0.8, nan, nan, 0.9]) is None  # epoch 4, the 20% before the last, not evaluated
    # by method: mean and the t-interval of the mean (t with n - 1 = 2 degrees of freedom: 4.303 at 95%)
    up = [[0.80 + step * e for e in range(10)] for step in (0.01, 0.02, 0.03)]  # drifts 0.02, 0.04, 0.06
    drift = drift_by_method([*up, plateau], ["npairs"] * 3 + ["hal"])
    n, mean, low, high = drift["npairs"]
    assert n == 3 and mean == pytest.approx(0.04) and high - mean == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)
    assert low == pytest.approx(2 * mean - high)
    assert drift["hal"][:2] == (1, pytest.approx(0.0025)) and math.isnan(drift["hal"][2])
